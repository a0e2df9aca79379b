//! README.md's configuration table is the one `Config::markdown_table()` renders from the key
//! table, so a new or changed key cannot be left out of the documentation.

#[test]
fn readme_has_the_current_configuration_table() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = customws::Config::markdown_table();
    assert!(
        readme.contains(table.trim_end()),
        "README.md's configuration table is stale; replace it with the output of Config::markdown_table():\n{table}"
    );
}
