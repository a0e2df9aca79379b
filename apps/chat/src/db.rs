//! The two storage backends behind one small interface: SQLite embedded (the default, one
//! file, no setup) and the seed's MySQL family (MariaDB/MySQL through the `mysql` crate).
//!
//! Both take the same SQL (`?` placeholders, backtick-quoted names, which SQLite accepts too)
//! with the same parameters, and return rows as [`Val`]s, so the queries in `store.rs` are
//! written once. The few statements that differ by dialect (DDL types, the presence upsert)
//! ask [`Db::kind`]. Every call blocks: only worker threads call into this module.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use mysql::prelude::Queryable;

/// A database error, as text (either driver's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbError(pub String);

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DbError {}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        DbError(format!("sqlite: {e}"))
    }
}

impl From<mysql::Error> for DbError {
    fn from(e: mysql::Error) -> Self {
        DbError(format!("mysql: {e}"))
    }
}

/// Which SQL dialect a [`Db`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// SQLite 3.
    Sqlite,
    /// MariaDB / MySQL.
    Mysql,
}

/// One SQL value: the only types the schema uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    /// NULL.
    Null,
    /// An integer (ids, timestamps in Unix ms, flags).
    Int(i64),
    /// Text.
    Text(String),
}

impl From<i64> for Val {
    fn from(v: i64) -> Self {
        Val::Int(v)
    }
}

impl From<bool> for Val {
    fn from(v: bool) -> Self {
        Val::Int(i64::from(v))
    }
}

impl From<&str> for Val {
    fn from(v: &str) -> Self {
        Val::Text(v.to_string())
    }
}

impl From<String> for Val {
    fn from(v: String) -> Self {
        Val::Text(v)
    }
}

impl From<&String> for Val {
    fn from(v: &String) -> Self {
        Val::Text(v.clone())
    }
}

impl<T: Into<Val>> From<Option<T>> for Val {
    fn from(v: Option<T>) -> Self {
        v.map_or(Val::Null, Into::into)
    }
}

/// Builds a parameter list: `params![a, b]`.
#[macro_export]
macro_rules! params {
    ($($v:expr),* $(,)?) => { vec![$($crate::db::Val::from($v)),*] };
}

/// One result row.
#[derive(Debug, Clone)]
pub struct Row(pub Vec<Val>);

impl Row {
    /// Column `i` as an integer (0 for NULL; text is parsed).
    pub fn int(&self, i: usize) -> i64 {
        match self.0.get(i) {
            Some(Val::Int(v)) => *v,
            Some(Val::Text(s)) => s.trim().parse().unwrap_or(0),
            _ => 0,
        }
    }

    /// Column `i` as an integer, `None` for NULL.
    pub fn opt_int(&self, i: usize) -> Option<i64> {
        match self.0.get(i) {
            Some(Val::Null) | None => None,
            _ => Some(self.int(i)),
        }
    }

    /// Column `i` as text ("" for NULL).
    pub fn text(&self, i: usize) -> String {
        self.opt_text(i).unwrap_or_default()
    }

    /// Column `i` as text, `None` for NULL.
    pub fn opt_text(&self, i: usize) -> Option<String> {
        match self.0.get(i) {
            Some(Val::Text(s)) => Some(s.clone()),
            Some(Val::Int(v)) => Some(v.to_string()),
            _ => None,
        }
    }
}

/// A test hook: every request of one message type first runs a database query that takes
/// `delay` (`SELECT chat_sleep_ms(…)` on SQLite, `SELECT SLEEP(…)` on MariaDB), holding a
/// pooled connection and a worker like a genuinely slow query would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlowQuery {
    /// The client message type it applies to (e.g. `GET_NOTIFICATIONS`).
    pub kind: String,
    /// How long the query takes.
    pub delay: Duration,
}

enum Backend {
    Sqlite { path: PathBuf, idle: Mutex<Vec<rusqlite::Connection>> },
    Mysql(mysql::Pool),
}

/// A database: a pool of connections to one of the two backends.
pub struct Db {
    backend: Backend,
    url: String,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("url", &redact(&self.url)).finish()
    }
}

/// The URL with its password hidden, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{user}:***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

impl Db {
    /// Opens `sqlite://PATH` (a file, created when missing) or `mysql://user:pass@host:port/db`
    /// with at most `max_connections` pooled connections, and brings the schema up to date.
    pub fn open(url: &str, max_connections: usize) -> Result<Db, DbError> {
        let backend = if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(DbError("sqlite:// needs a file path, e.g. sqlite://chat.db".into()));
            }
            let first = open_sqlite(path)?;
            Backend::Sqlite { path: PathBuf::from(path), idle: Mutex::new(vec![first]) }
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            let url = url.replacen("mariadb://", "mysql://", 1);
            let opts = mysql::Opts::from_url(&url).map_err(|e| DbError(format!("bad database URL: {e}")))?;
            let constraints = mysql::PoolConstraints::new(1, max_connections.max(1))
                .ok_or_else(|| DbError("bad pool size".into()))?;
            let opts = mysql::OptsBuilder::from_opts(opts)
                .pool_opts(mysql::PoolOpts::default().with_constraints(constraints))
                .tcp_connect_timeout(Some(Duration::from_secs(5)));
            Backend::Mysql(mysql::Pool::new(opts)?)
        } else {
            return Err(DbError(format!(
                "unsupported database URL {:?}: use sqlite://PATH or mysql://user:pass@host:port/db",
                redact(url)
            )));
        };
        let db = Db { backend, url: url.to_string() };
        crate::schema::migrate(&db)?;
        Ok(db)
    }

    /// The dialect.
    pub fn kind(&self) -> Kind {
        match self.backend {
            Backend::Sqlite { .. } => Kind::Sqlite,
            Backend::Mysql(_) => Kind::Mysql,
        }
    }

    /// A connection from the pool (returned when dropped).
    pub fn conn(&self) -> Result<DbConn<'_>, DbError> {
        let inner = match &self.backend {
            Backend::Sqlite { path, idle } => {
                let pooled = idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
                match pooled {
                    Some(conn) => Inner::Sqlite(conn),
                    None => Inner::Sqlite(open_sqlite(&path.to_string_lossy())?),
                }
            }
            Backend::Mysql(pool) => Inner::Mysql(pool.get_conn()?),
        };
        Ok(DbConn { db: self, inner: Some(inner) })
    }
}

fn open_sqlite(path: &str) -> Result<rusqlite::Connection, DbError> {
    let conn = rusqlite::Connection::open(path)?;
    // SQLite has one writer at a time; the others retry. Its default busy handler backs off to
    // 100 ms sleeps, which shows up as a long latency tail under concurrent writes; retry
    // every 200 µs instead, for at most ~5 s.
    conn.busy_handler(Some(retry_busy))?;
    // WAL: readers never block the writer; NORMAL: a commit does not wait for fsync (a crash
    // may lose the last transactions, never corrupt the file).
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.create_scalar_function(
        "chat_sleep_ms",
        1,
        rusqlite::functions::FunctionFlags::SQLITE_UTF8,
        |ctx| {
            let ms: i64 = ctx.get(0)?;
            std::thread::sleep(Duration::from_millis(ms.clamp(0, 60_000) as u64));
            Ok(ms)
        },
    )?;
    Ok(conn)
}

fn retry_busy(attempt: i32) -> bool {
    if attempt >= 25_000 {
        return false;
    }
    std::thread::sleep(Duration::from_micros(200));
    true
}

enum Inner {
    Sqlite(rusqlite::Connection),
    Mysql(mysql::PooledConn),
}

/// A pooled connection.
pub struct DbConn<'a> {
    db: &'a Db,
    inner: Option<Inner>,
}

impl std::fmt::Debug for DbConn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbConn").field("kind", &self.db.kind()).finish()
    }
}

impl Drop for DbConn<'_> {
    fn drop(&mut self) {
        if let (Some(Inner::Sqlite(conn)), Backend::Sqlite { idle, .. }) =
            (self.inner.take(), &self.db.backend)
        {
            idle.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
        }
    }
}

fn to_sqlite(v: &Val) -> rusqlite::types::Value {
    match v {
        Val::Null => rusqlite::types::Value::Null,
        Val::Int(i) => rusqlite::types::Value::Integer(*i),
        Val::Text(s) => rusqlite::types::Value::Text(s.clone()),
    }
}

fn from_sqlite(v: rusqlite::types::ValueRef<'_>) -> Val {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Val::Null,
        ValueRef::Integer(i) => Val::Int(i),
        ValueRef::Real(f) => Val::Int(f as i64),
        ValueRef::Text(t) | ValueRef::Blob(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
    }
}

fn to_mysql(params: &[Val]) -> mysql::Params {
    if params.is_empty() {
        return mysql::Params::Empty;
    }
    mysql::Params::Positional(
        params
            .iter()
            .map(|v| match v {
                Val::Null => mysql::Value::NULL,
                Val::Int(i) => mysql::Value::Int(*i),
                Val::Text(s) => mysql::Value::Bytes(s.as_bytes().to_vec()),
            })
            .collect(),
    )
}

fn from_mysql(v: mysql::Value) -> Val {
    match v {
        mysql::Value::NULL => Val::Null,
        mysql::Value::Int(i) => Val::Int(i),
        mysql::Value::UInt(u) => Val::Int(u as i64),
        mysql::Value::Float(f) => Val::Int(f as i64),
        mysql::Value::Double(f) => Val::Int(f as i64),
        mysql::Value::Bytes(b) => Val::Text(String::from_utf8_lossy(&b).into_owned()),
        other => Val::Text(other.as_sql(true)),
    }
}

impl DbConn<'_> {
    /// The dialect.
    pub fn kind(&self) -> Kind {
        self.db.kind()
    }

    fn inner(&mut self) -> &mut Inner {
        // Always `Some` until drop.
        self.inner.as_mut().expect("connection used after drop")
    }

    /// Runs a statement; returns the number of rows it changed.
    pub fn exec(&mut self, sql: &str, params: Vec<Val>) -> Result<u64, DbError> {
        match self.inner() {
            Inner::Sqlite(conn) => {
                let mut stmt = conn.prepare_cached(sql)?;
                let n = stmt.execute(rusqlite::params_from_iter(params.iter().map(to_sqlite)))?;
                Ok(n as u64)
            }
            Inner::Mysql(conn) => {
                conn.exec_drop(sql, to_mysql(&params))?;
                Ok(conn.affected_rows())
            }
        }
    }

    /// Runs an `INSERT`; returns the new row's id.
    pub fn insert(&mut self, sql: &str, params: Vec<Val>) -> Result<i64, DbError> {
        match self.inner() {
            Inner::Sqlite(conn) => {
                let mut stmt = conn.prepare_cached(sql)?;
                stmt.execute(rusqlite::params_from_iter(params.iter().map(to_sqlite)))?;
                Ok(conn.last_insert_rowid())
            }
            Inner::Mysql(conn) => {
                conn.exec_drop(sql, to_mysql(&params))?;
                Ok(conn.last_insert_id() as i64)
            }
        }
    }

    /// Runs a query; returns every row.
    pub fn query(&mut self, sql: &str, params: Vec<Val>) -> Result<Vec<Row>, DbError> {
        match self.inner() {
            Inner::Sqlite(conn) => {
                let mut stmt = conn.prepare_cached(sql)?;
                let columns = stmt.column_count();
                let mut rows = stmt.query(rusqlite::params_from_iter(params.iter().map(to_sqlite)))?;
                let mut out = Vec::new();
                while let Some(row) = rows.next()? {
                    let mut vals = Vec::with_capacity(columns);
                    for i in 0..columns {
                        vals.push(from_sqlite(row.get_ref(i)?));
                    }
                    out.push(Row(vals));
                }
                Ok(out)
            }
            Inner::Mysql(conn) => {
                let rows: Vec<mysql::Row> = conn.exec(sql, to_mysql(&params))?;
                Ok(rows
                    .into_iter()
                    .map(|row| Row(row.unwrap().into_iter().map(from_mysql).collect()))
                    .collect())
            }
        }
    }

    /// Runs one statement of DDL or transaction control, without parameters.
    pub fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        match self.inner() {
            Inner::Sqlite(conn) => Ok(conn.execute_batch(sql)?),
            Inner::Mysql(conn) => Ok(conn.query_drop(sql)?),
        }
    }

    /// A query that takes `delay` inside the database (the slow-query hook).
    pub fn sleep(&mut self, delay: Duration) -> Result<(), DbError> {
        let ms = delay.as_millis().min(60_000) as i64;
        match self.kind() {
            Kind::Sqlite => self.query("SELECT chat_sleep_ms(?)", params![ms]).map(drop),
            Kind::Mysql => self.batch(&format!("SELECT SLEEP({}.{:03})", ms / 1000, ms % 1000)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_the_password_only() {
        assert_eq!(redact("mysql://chat:s3cret@db:3306/chat"), "mysql://chat:***@db:3306/chat");
        assert_eq!(redact("sqlite://chat.db"), "sqlite://chat.db");
    }

    #[test]
    fn unsupported_urls_are_refused_by_name() {
        let err = Db::open("postgres://u:p@h/db", 1).unwrap_err();
        assert!(err.0.contains("unsupported database URL") && err.0.contains("***"), "{err}");
        assert!(Db::open("sqlite://", 1).is_err());
    }

    #[test]
    fn rows_convert_between_types() {
        let row = Row(vec![Val::Int(5), Val::Text("12".into()), Val::Null]);
        assert_eq!((row.int(0), row.int(1), row.int(2)), (5, 12, 0));
        assert_eq!((row.opt_int(2), row.opt_text(2), row.text(0)), (None, None, "5".to_string()));
    }
}
