//! Broker subject names. One syntax serves both engines: dot-separated tokens under the
//! configured prefix (`{p}.dir`, `{p}.all`, `{p}.n.{node}`, `{p}.u.{user}`, `{p}.r.{room}`,
//! `{p}.probe.{node}`). Redis channels accept any bytes; NATS tokens may not contain `.`, `*`,
//! `>` or whitespace, so a user or room name that is not plain `[A-Za-z0-9_-]+` is written as
//! `=` followed by its hex bytes (`=` never appears in a plain token, so the two never collide).

use std::fmt::Write;

/// Builds the subjects of one node under one prefix.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
    node: String,
}

impl Subjects {
    /// Subjects under `prefix` for the node `node` (both `[A-Za-z0-9_-]{1,64}`, checked by the
    /// configuration).
    pub fn new(prefix: &str, node: &str) -> Subjects {
        Subjects { prefix: token(prefix), node: token(node) }
    }

    /// The directory subject every node subscribes to: heartbeats and state records.
    pub fn dir(&self) -> String {
        format!("{}.dir", self.prefix)
    }

    /// The subject every node subscribes to for broadcasts.
    pub fn all(&self) -> String {
        format!("{}.all", self.prefix)
    }

    /// This node's own subject (targeted messages, replies).
    pub fn me(&self) -> String {
        self.node(&self.node)
    }

    /// The subject of node `node`.
    pub fn node(&self, node: &str) -> String {
        format!("{}.n.{}", self.prefix, token(node))
    }

    /// The subject of user `user`, subscribed by every node that holds one of its connections.
    pub fn user(&self, user: &str) -> String {
        format!("{}.u.{}", self.prefix, token(user))
    }

    /// The subject of room `room`, subscribed by every node with a member.
    pub fn room(&self, room: &str) -> String {
        format!("{}.r.{}", self.prefix, token(room))
    }

    /// This node's probe subject: published to wake (and check) its own subscriber link.
    pub fn probe(&self) -> String {
        format!("{}.probe.{}", self.prefix, self.node)
    }

    /// What a received subject addresses: a user, a room, everyone, or something else (the
    /// directory, a node, the probe).
    pub fn target(&self, subject: &str) -> Target {
        let Some(rest) = subject.strip_prefix(&self.prefix).and_then(|r| r.strip_prefix('.')) else {
            return Target::Other;
        };
        if rest == "all" {
            return Target::All;
        }
        let name = |tok: &str| untoken(tok);
        match rest.split_once('.') {
            Some(("u", tok)) => name(tok).map_or(Target::Other, Target::User),
            Some(("r", tok)) => name(tok).map_or(Target::Other, Target::Room),
            _ => Target::Other,
        }
    }

    /// Whether `subject` is a user subject under this prefix.
    pub fn is_user(&self, subject: &str) -> bool {
        subject.strip_prefix(&self.prefix).is_some_and(|rest| rest.starts_with(".u."))
    }
}

/// What a subject addresses (see [`Subjects::target`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A user's subject, with the user id as written.
    User(String),
    /// A room's subject, with the room name.
    Room(String),
    /// The broadcast subject.
    All,
    /// Anything else.
    Other,
}

/// The name a token stands for: the inverse of [`token`]; `None` for bad hex or UTF-8.
fn untoken(tok: &str) -> Option<String> {
    let Some(hex) = tok.strip_prefix('=') else { return Some(tok.to_string()) };
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect();
    String::from_utf8(bytes?).ok()
}

/// `name` as one subject token: itself when plain, else `=` + lowercase hex of its bytes.
fn token(name: &str) -> String {
    let plain = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        return name.to_string();
    }
    let mut out = String::with_capacity(1 + 2 * name.len());
    out.push('=');
    for byte in name.bytes() {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_have_the_documented_shapes() {
        let s = Subjects::new("customws", "node-1");
        assert_eq!(s.dir(), "customws.dir");
        assert_eq!(s.all(), "customws.all");
        assert_eq!(s.me(), "customws.n.node-1");
        assert_eq!(s.node("b"), "customws.n.b");
        assert_eq!(s.user("42"), "customws.u.42");
        assert_eq!(s.room("lobby_1"), "customws.r.lobby_1");
        assert_eq!(s.probe(), "customws.probe.node-1");
        assert!(s.is_user(&s.user("x")) && !s.is_user(&s.room("x")));
    }

    #[test]
    fn targets_are_read_back_from_subjects() {
        let s = Subjects::new("p", "n");
        assert_eq!(s.target(&s.user("42")), Target::User("42".into()));
        assert_eq!(s.target(&s.user("-7")), Target::User("-7".into()));
        assert_eq!(s.target(&s.room("caf\u{e9} a..b")), Target::Room("caf\u{e9} a..b".into()));
        assert_eq!(s.target(&s.all()), Target::All);
        assert_eq!(s.target(&s.dir()), Target::Other);
        assert_eq!(s.target("q.u.1"), Target::Other);
        assert_eq!(s.target("p.r.=zz"), Target::Other);
        assert_eq!(s.target("p.r.=c3"), Target::Other);
    }

    #[test]
    fn names_unsafe_for_nats_are_hex_and_never_collide() {
        let s = Subjects::new("p", "n");
        assert_eq!(s.room("a..b"), "p.r.=612e2e62");
        assert_eq!(s.user("*"), "p.u.=2a");
        assert_eq!(s.user(""), "p.u.=");
        assert_eq!(s.room("caf\u{e9} x>"), "p.r.=636166c3a920783e");
        // A plain name that looks like hex stays itself; the hex form always starts with '='.
        assert_ne!(s.user("2a"), s.user("*"));
        for name in ["a.b", "a b", "a>b", "a*", "\u{1f600}", "tab\t"] {
            let subject = s.user(name);
            let tok = subject.rsplit('.').next().unwrap();
            assert!(tok.bytes().all(|b| b.is_ascii_graphic() && !b"*>.".contains(&b)), "{subject}");
        }
    }
}
