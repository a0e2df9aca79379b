//! The schema (seed 002's tables) and its migrations, applied at start.
//!
//! `SchemaVersion` holds the version reached; each migration is a list of statements written
//! once with placeholders for the few types that differ by dialect. Timestamps are Unix
//! milliseconds in `BIGINT` columns, so no query depends on either database's clock functions.

use crate::db::{Db, DbError, Kind};

/// `(version, statements)`, in order. Add a migration by appending; never edit a shipped one.
const MIGRATIONS: &[(i64, &[&str])] = &[(
    1,
    &[
        "CREATE TABLE Country (Id {pk}, Name {str} NOT NULL){engine}",
        "CREATE TABLE `User` (Id {pk}, UserName {str} NOT NULL UNIQUE, FirstName {str} NOT NULL,
            LastName {str} NOT NULL, Email {str} NOT NULL, Phone {str} NOT NULL, Picture {str} NOT NULL,
            Headline {str} NOT NULL, CreatedAt BIGINT NOT NULL){engine}",
        "CREATE TABLE Session (Id {pk}, UserId BIGINT NOT NULL, Tk {str} NOT NULL UNIQUE,
            ExpiresAt BIGINT NOT NULL){engine}",
        "CREATE TABLE Contact (Id {pk}, User1Id BIGINT NOT NULL, User2Id BIGINT NOT NULL,
            Status {str} NOT NULL, ChatId {str} NOT NULL UNIQUE, UNIQUE (User1Id, User2Id)){engine}",
        "CREATE TABLE ChatMessage (Id {pk}, ChatId {str} NOT NULL, FromUserId BIGINT NOT NULL,
            ToUserId BIGINT NOT NULL, Content {text} NOT NULL, CreatedAt BIGINT NOT NULL,
            StatusId INT NOT NULL, DeliveredAt BIGINT NULL, ReadAt BIGINT NULL){engine}",
        "CREATE INDEX ChatMessageByRecipient ON ChatMessage (ToUserId, StatusId)",
        "CREATE INDEX ChatMessageByChat ON ChatMessage (ChatId, Id)",
        "CREATE TABLE UserStatus (UserId BIGINT NOT NULL PRIMARY KEY, IsOnline INT NOT NULL,
            LastSeen BIGINT NULL){engine}",
        "CREATE TABLE Notification (Id {pk}, UserId BIGINT NOT NULL, Type {str} NOT NULL,
            Title {str} NOT NULL, Message {text} NOT NULL, CreatedAt BIGINT NOT NULL,
            IsRead INT NOT NULL, Payload {text} NULL){engine}",
        "CREATE INDEX NotificationByUser ON Notification (UserId, Id)",
        "CREATE TABLE Education (Id {pk}, PersonId BIGINT NOT NULL, Institution {str} NOT NULL,
            Degree {str} NOT NULL, Campus {str} NOT NULL, GraduationDate {str} NOT NULL,
            CountryId BIGINT NULL){engine}",
        "CREATE TABLE WorkExperience (Id {pk}, PersonId BIGINT NOT NULL, Company {str} NOT NULL,
            Position {str} NOT NULL, StartDate {str} NOT NULL, EndDate {str} NULL,
            Description {text} NOT NULL, CountryId BIGINT NULL){engine}",
    ],
)];

/// The version the code expects.
pub const VERSION: i64 = 1;

fn render(kind: Kind, sql: &str) -> String {
    let (pk, string, engine) = match kind {
        Kind::Sqlite => ("INTEGER PRIMARY KEY AUTOINCREMENT", "TEXT", ""),
        Kind::Mysql => {
            ("BIGINT PRIMARY KEY AUTO_INCREMENT", "VARCHAR(255)", " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4")
        }
    };
    sql.replace("{pk}", pk).replace("{str}", string).replace("{text}", "TEXT").replace("{engine}", engine)
}

/// Creates the tables on an empty database and applies every migration not yet applied.
/// Fails on a database newer than this code.
pub fn migrate(db: &Db) -> Result<(), DbError> {
    let mut conn = db.conn()?;
    conn.batch("CREATE TABLE IF NOT EXISTS SchemaVersion (Version BIGINT NOT NULL)")?;
    let rows = conn.query("SELECT Version FROM SchemaVersion", Vec::new())?;
    let mut current = rows.iter().map(|r| r.int(0)).max().unwrap_or(0);
    if rows.is_empty() {
        conn.exec("INSERT INTO SchemaVersion (Version) VALUES (0)", Vec::new())?;
    }
    if current > VERSION {
        return Err(DbError(format!(
            "database schema version {current} is newer than this server's {VERSION}"
        )));
    }
    for (version, statements) in MIGRATIONS {
        if *version <= current {
            continue;
        }
        for statement in *statements {
            conn.batch(&render(db.kind(), statement))?;
        }
        conn.exec("UPDATE SchemaVersion SET Version = ?", crate::params![*version])?;
        current = *version;
        log::info!("database schema migrated to version {current}");
    }
    Ok(())
}
