//! Demo data for trying the server: users with profiles (education and work experience in
//! several countries), contacts in each state, notifications, and session tokens.

use crate::db::{Db, DbConn, DbError};
use crate::params;
use crate::store::now_ms;

/// A seeded user and a session token for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seeded {
    /// User id.
    pub id: i64,
    /// User name.
    pub username: String,
    /// A valid session token (`/ws?token=…`).
    pub token: String,
}

/// How long seeded sessions last.
pub const SESSION_TTL_MS: i64 = 30 * 24 * 3600 * 1000;

const COUNTRIES: &[&str] = &["España", "México", "Argentina", "Colombia", "Chile", "Perú"];

/// `(username, first, last, headline)`.
const PEOPLE: &[(&str, &str, &str, &str)] = &[
    ("alice", "Alicia", "García", "Backend engineer"),
    ("bob", "Roberto", "López", "Data analyst"),
    ("carol", "Carolina", "Martínez", "Product designer"),
    ("dave", "David", "Fernández", "Recruiter"),
];

/// Accepted contacts: alice–bob, alice–carol; pending: bob–carol; dave has none.
const CONTACTS: &[(usize, usize, &str)] = &[(0, 1, "accepted"), (0, 2, "accepted"), (1, 2, "pending")];

/// Creates the demo users (once; later runs only add fresh sessions) and returns a new token
/// for each, in the order alice, bob, carol, dave.
pub fn demo(db: &Db) -> Result<Vec<Seeded>, DbError> {
    let mut conn = db.conn()?;
    let mut ids = Vec::new();
    let existing = conn.query("SELECT Id FROM `User` WHERE UserName = ?", params!["alice"])?;
    if existing.is_empty() {
        conn.batch("BEGIN")?;
        let countries: Vec<i64> = COUNTRIES
            .iter()
            .map(|name| conn.insert("INSERT INTO Country (Name) VALUES (?)", params![*name]))
            .collect::<Result<_, _>>()?;
        for (i, (username, first, last, headline)) in PEOPLE.iter().enumerate() {
            let id = insert_user(&mut conn, username, first, last, headline)?;
            let country = countries[i % countries.len()];
            let other = countries[(i + 1) % countries.len()];
            conn.insert(
                "INSERT INTO Education (PersonId, Institution, Degree, Campus, GraduationDate, CountryId)
                 VALUES (?, ?, ?, ?, ?, ?)",
                params![
                    id,
                    "Universidad Nacional",
                    "Ingeniería Informática",
                    "Central",
                    "2015-07-01",
                    country
                ],
            )?;
            // One education item without a country: `country_name` is then omitted.
            conn.insert(
                "INSERT INTO Education (PersonId, Institution, Degree, Campus, GraduationDate, CountryId)
                 VALUES (?, ?, ?, ?, ?, NULL)",
                params![id, "Coursera", "Machine Learning", "Online", "2018-03-15"],
            )?;
            conn.insert(
                "INSERT INTO WorkExperience (PersonId, Company, Position, StartDate, EndDate, Description, CountryId)
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
                params![id, "Acme S.A.", *headline, "2016-01-01", "2020-12-31", "Built things.", other],
            )?;
            conn.insert(
                "INSERT INTO WorkExperience (PersonId, Company, Position, StartDate, EndDate, Description, CountryId)
                 VALUES (?, ?, ?, ?, NULL, ?, ?)",
                params![id, "Globex", format!("Senior {headline}"), "2021-01-01", "Current role.", country],
            )?;
            conn.insert(
                "INSERT INTO Notification (UserId, Type, Title, Message, CreatedAt, IsRead, Payload)
                 VALUES (?, 'welcome', 'Bienvenido', 'Welcome to the chat', ?, 0, NULL)",
                params![id, now_ms()],
            )?;
            ids.push(id);
        }
        for (a, b, status) in CONTACTS {
            add_contact(&mut conn, ids[*a], ids[*b], status)?;
        }
        conn.batch("COMMIT")?;
    } else {
        for (username, ..) in PEOPLE {
            let row = conn.query("SELECT Id FROM `User` WHERE UserName = ?", params![*username])?;
            ids.push(
                row.first().map(|r| r.int(0)).ok_or_else(|| DbError(format!("user {username} missing")))?,
            );
        }
    }
    PEOPLE
        .iter()
        .zip(ids)
        .map(|((username, ..), id)| {
            let token = new_session(&mut conn, id)?;
            Ok(Seeded { id, username: (*username).to_string(), token })
        })
        .collect()
}

/// `pairs` pairs of users who are accepted contacts (`<prefix>a<i>` with `<prefix>b<i>`), each
/// with a session: for load tests.
pub fn pairs(db: &Db, prefix: &str, pairs: usize) -> Result<Vec<(Seeded, Seeded)>, DbError> {
    let mut conn = db.conn()?;
    conn.batch("BEGIN")?;
    let mut out = Vec::with_capacity(pairs);
    for i in 0..pairs {
        let mut make = |side: &str| -> Result<Seeded, DbError> {
            let username = format!("{prefix}{side}{i}");
            let id = insert_user(&mut conn, &username, "Load", side, "tester")?;
            Ok(Seeded { id, username, token: new_session(&mut conn, id)? })
        };
        let (a, b) = (make("a")?, make("b")?);
        add_contact(&mut conn, a.id, b.id, "accepted")?;
        out.push((a, b));
    }
    conn.batch("COMMIT")?;
    Ok(out)
}

fn insert_user(
    conn: &mut DbConn<'_>,
    username: &str,
    first: &str,
    last: &str,
    headline: &str,
) -> Result<i64, DbError> {
    let email = format!("{username}@example.com");
    conn.insert(
        "INSERT INTO `User` (UserName, FirstName, LastName, Email, Phone, Picture, Headline, CreatedAt)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        params![username, first, last, email, "+34 600 000 000", "", headline, now_ms()],
    )
}

/// Adds a contact pair with its chat id (`chat_<low id>_<high id>`).
pub fn add_contact(conn: &mut DbConn<'_>, a: i64, b: i64, status: &str) -> Result<String, DbError> {
    let (lo, hi) = (a.min(b), a.max(b));
    let chat = format!("chat_{lo}_{hi}");
    conn.insert(
        "INSERT INTO Contact (User1Id, User2Id, Status, ChatId) VALUES (?, ?, ?, ?)",
        params![lo, hi, status, chat.as_str()],
    )?;
    Ok(chat)
}

fn new_session(conn: &mut DbConn<'_>, user: i64) -> Result<String, DbError> {
    let token = crate::auth::new_token()?;
    crate::store::create_session(conn, user, &token, now_ms() + SESSION_TTL_MS)?;
    Ok(token)
}
