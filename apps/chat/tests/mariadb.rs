//! The main flows against a real MariaDB server, started by the test itself (see
//! `common::mariadb`): one server for all of them, a fresh database per flow.

mod common;

use common::mariadb::MariaDb;
use common::{Fixture, flows};

type Flow = fn(&Fixture);

#[test]
fn main_flows_on_mariadb() {
    let server = MariaDb::start();
    assert!(server.startup.as_secs() < 30, "MariaDB start-up took {:?}", server.startup);
    let runs: [(&str, Flow); 6] = [
        ("send_online", flows::send_to_online),
        ("send_offline", flows::send_to_offline_then_connect),
        ("read_receipts", flows::read_receipts),
        ("contacts_only", flows::contacts_only),
        ("presence", flows::presence_to_contacts),
        ("profile", flows::profile_with_country),
    ];
    for (name, flow) in runs {
        let url = server.fresh_database(&format!("chat_{name}"));
        let fixture = Fixture::on(&url, |_, _| {});
        flow(&fixture);
        eprintln!("mariadb flow {name}: ok");
    }
}
