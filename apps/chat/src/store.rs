//! Every query the chat server runs, written once for both backends.

use crate::db::{DbConn, DbError, Kind, Row};
use crate::model::{
    ChatInfo, CurriculumVitae, EducationItem, NotificationInfo, ProfileData, WorkExperienceItem,
};
use crate::params;

/// Message status ids (seed: `StatusID: 1 // "sent_to_server"`).
pub const SENT: i64 = 1;
/// Acknowledged by the recipient's client.
pub const DELIVERED: i64 = 2;
/// Read by the recipient.
pub const READ: i64 = 3;

/// The status name for an id.
pub fn status_name(status: i64) -> &'static str {
    match status {
        DELIVERED => "delivered",
        READ => "read",
        _ => "sent",
    }
}

/// Now, Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A session with its user, as the authentication cache holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    /// The token.
    pub token: String,
    /// Expiry, Unix ms.
    pub expires_at: i64,
    /// The user.
    pub user: crate::model::WsUserData,
}

/// Every unexpired session.
pub fn live_sessions(db: &mut DbConn<'_>, now: i64) -> Result<Vec<SessionRow>, DbError> {
    let rows = db.query(
        "SELECT s.Tk, s.ExpiresAt, u.Id, u.UserName, u.FirstName, u.LastName
         FROM Session s JOIN `User` u ON u.Id = s.UserId WHERE s.ExpiresAt > ?",
        params![now],
    )?;
    Ok(rows
        .iter()
        .map(|r| SessionRow {
            token: r.text(0),
            expires_at: r.int(1),
            user: crate::model::WsUserData {
                id: r.int(2),
                username: r.text(3),
                first_name: r.text(4),
                last_name: r.text(5),
            },
        })
        .collect())
}

/// Stores a session.
pub fn create_session(db: &mut DbConn<'_>, user: i64, token: &str, expires_at: i64) -> Result<(), DbError> {
    db.insert(
        "INSERT INTO Session (UserId, Tk, ExpiresAt) VALUES (?, ?, ?)",
        params![user, token, expires_at],
    )
    .map(drop)
}

/// Deletes a session; true when it existed.
pub fn delete_session(db: &mut DbConn<'_>, token: &str) -> Result<bool, DbError> {
    Ok(db.exec("DELETE FROM Session WHERE Tk = ?", params![token])? > 0)
}

/// Seed §9.2 `SetUserOnlineStatus`: `LastSeen` changes only when going offline.
pub fn set_online(db: &mut DbConn<'_>, user: i64, online: bool, now: i64) -> Result<(), DbError> {
    let sql = match db.kind() {
        Kind::Mysql => {
            "INSERT INTO UserStatus (UserId, IsOnline, LastSeen) VALUES (?, ?, ?)
             ON DUPLICATE KEY UPDATE IsOnline = VALUES(IsOnline),
               LastSeen = CASE WHEN VALUES(IsOnline) = 0 THEN VALUES(LastSeen) ELSE LastSeen END"
        }
        Kind::Sqlite => {
            "INSERT INTO UserStatus (UserId, IsOnline, LastSeen) VALUES (?, ?, ?)
             ON CONFLICT (UserId) DO UPDATE SET IsOnline = excluded.IsOnline,
               LastSeen = CASE WHEN excluded.IsOnline = 0 THEN excluded.LastSeen ELSE UserStatus.LastSeen END"
        }
    };
    db.exec(sql, params![user, online, now]).map(drop)
}

/// `(IsOnline, LastSeen)` as stored.
pub fn stored_status(db: &mut DbConn<'_>, user: i64) -> Result<Option<(bool, Option<i64>)>, DbError> {
    let rows = db.query("SELECT IsOnline, LastSeen FROM UserStatus WHERE UserId = ?", params![user])?;
    Ok(rows.first().map(|r| (r.int(0) != 0, r.opt_int(1))))
}

/// The user's accepted contacts.
pub fn accepted_contacts(db: &mut DbConn<'_>, user: i64) -> Result<Vec<i64>, DbError> {
    let rows = db.query(
        "SELECT CASE WHEN User1Id = ? THEN User2Id ELSE User1Id END FROM Contact
         WHERE (User1Id = ? OR User2Id = ?) AND Status = 'accepted'",
        params![user, user, user],
    )?;
    Ok(rows.iter().map(|r| r.int(0)).collect())
}

/// The chat of two users when they are accepted contacts.
pub fn chat_between(db: &mut DbConn<'_>, a: i64, b: i64) -> Result<Option<String>, DbError> {
    let (lo, hi) = (a.min(b), a.max(b));
    let rows = db.query(
        "SELECT ChatId FROM Contact WHERE User1Id = ? AND User2Id = ? AND Status = 'accepted'",
        params![lo, hi],
    )?;
    Ok(rows.first().map(|r| r.text(0)))
}

/// The other member of `chat` when `user` is one of its (accepted) members.
pub fn chat_partner(db: &mut DbConn<'_>, chat: &str, user: i64) -> Result<Option<i64>, DbError> {
    let rows = db.query(
        "SELECT User1Id, User2Id FROM Contact WHERE ChatId = ? AND Status = 'accepted'
           AND (User1Id = ? OR User2Id = ?)",
        params![chat, user, user],
    )?;
    Ok(rows.first().map(|r| if r.int(0) == user { r.int(1) } else { r.int(0) }))
}

/// A stored chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Id.
    pub id: i64,
    /// Chat.
    pub chat_id: String,
    /// Sender.
    pub from: i64,
    /// Sender's user name.
    pub from_username: String,
    /// Recipient.
    pub to: i64,
    /// Text.
    pub text: String,
    /// Unix ms.
    pub created_at: i64,
}

/// Stores a new message with status sent; returns its id.
pub fn insert_message(
    db: &mut DbConn<'_>,
    chat: &str,
    from: i64,
    to: i64,
    text: &str,
    now: i64,
) -> Result<i64, DbError> {
    db.insert(
        "INSERT INTO ChatMessage (ChatId, FromUserId, ToUserId, Content, CreatedAt, StatusId)
         VALUES (?, ?, ?, ?, ?, ?)",
        params![chat, from, to, text, now, SENT],
    )
}

/// Messages to `user` not yet delivered, oldest first, at most `limit`.
pub fn undelivered(db: &mut DbConn<'_>, user: i64, limit: i64) -> Result<Vec<Message>, DbError> {
    let rows = db.query(
        "SELECT m.Id, m.ChatId, m.FromUserId, u.UserName, m.ToUserId, m.Content, m.CreatedAt
         FROM ChatMessage m JOIN `User` u ON u.Id = m.FromUserId
         WHERE m.ToUserId = ? AND m.StatusId = ? ORDER BY m.Id LIMIT ?",
        params![user, SENT, limit],
    )?;
    Ok(rows.iter().map(message_row).collect())
}

fn message_row(r: &Row) -> Message {
    Message {
        id: r.int(0),
        chat_id: r.text(1),
        from: r.int(2),
        from_username: r.text(3),
        to: r.int(4),
        text: r.text(5),
        created_at: r.int(6),
    }
}

/// The status of a message (`None`: no such message).
pub fn message_status(db: &mut DbConn<'_>, id: i64) -> Result<Option<i64>, DbError> {
    let rows = db.query("SELECT StatusId FROM ChatMessage WHERE Id = ?", params![id])?;
    Ok(rows.first().map(|r| r.int(0)))
}

/// sent → delivered; true when it changed (never downgrades a read message).
pub fn mark_delivered(db: &mut DbConn<'_>, id: i64, now: i64) -> Result<bool, DbError> {
    Ok(db.exec(
        "UPDATE ChatMessage SET StatusId = ?, DeliveredAt = ? WHERE Id = ? AND StatusId = ?",
        params![DELIVERED, now, id, SENT],
    )? > 0)
}

/// Marks the messages to `reader` in `chat` (up to `up_to` when given) read; returns their
/// ids, oldest first.
pub fn mark_read(
    db: &mut DbConn<'_>,
    chat: &str,
    reader: i64,
    up_to: Option<i64>,
    now: i64,
) -> Result<Vec<i64>, DbError> {
    let up_to = up_to.unwrap_or(i64::MAX);
    let rows = db.query(
        "SELECT Id FROM ChatMessage WHERE ChatId = ? AND ToUserId = ? AND StatusId < ? AND Id <= ?
         ORDER BY Id LIMIT 1000",
        params![chat, reader, READ, up_to],
    )?;
    let ids: Vec<i64> = rows.iter().map(|r| r.int(0)).collect();
    let Some(&last) = ids.last() else {
        return Ok(ids);
    };
    db.exec(
        "UPDATE ChatMessage SET StatusId = ?, ReadAt = ? WHERE ChatId = ? AND ToUserId = ? AND StatusId < ? AND Id <= ?",
        params![READ, now, chat, reader, READ, last],
    )?;
    Ok(ids)
}

/// The user's chats (one per accepted contact), newest activity first; `is_other_online` is
/// left false for the caller to fill in.
pub fn chat_list(db: &mut DbConn<'_>, user: i64) -> Result<Vec<ChatInfo>, DbError> {
    let rows = db.query(
        "SELECT c.ChatId, u.Id, u.UserName, u.FirstName, u.LastName, u.Picture,
           (SELECT m.Content FROM ChatMessage m WHERE m.ChatId = c.ChatId ORDER BY m.Id DESC LIMIT 1),
           (SELECT m.CreatedAt FROM ChatMessage m WHERE m.ChatId = c.ChatId ORDER BY m.Id DESC LIMIT 1),
           (SELECT COUNT(*) FROM ChatMessage m WHERE m.ChatId = c.ChatId AND m.ToUserId = ? AND m.StatusId < ?)
         FROM Contact c JOIN `User` u ON u.Id = CASE WHEN c.User1Id = ? THEN c.User2Id ELSE c.User1Id END
         WHERE (c.User1Id = ? OR c.User2Id = ?) AND c.Status = 'accepted'",
        params![user, READ, user, user, user],
    )?;
    let mut chats: Vec<ChatInfo> = rows
        .iter()
        .map(|r| ChatInfo {
            chat_id: r.text(0),
            other_user_id: r.int(1),
            other_user_name: r.text(2),
            other_first_name: r.text(3),
            other_last_name: r.text(4),
            other_picture: r.text(5),
            is_other_online: false,
            last_message: r.text(6),
            last_message_ts: r.int(7),
            unread_count: r.int(8),
        })
        .collect();
    chats.sort_by(|a, b| {
        b.last_message_ts.cmp(&a.last_message_ts).then(a.other_user_id.cmp(&b.other_user_id))
    });
    Ok(chats)
}

/// The profile of `user` (`None`: no such user), with every field; the caller hides what the
/// viewer may not see and fills in `is_online`.
pub fn profile(db: &mut DbConn<'_>, user: i64) -> Result<Option<ProfileData>, DbError> {
    let rows = db.query(
        "SELECT u.Id, u.FirstName, u.LastName, u.UserName, u.Email, u.Phone, u.Picture, u.Headline, s.LastSeen
         FROM `User` u LEFT JOIN UserStatus s ON s.UserId = u.Id WHERE u.Id = ?",
        params![user],
    )?;
    let Some(r) = rows.first() else {
        return Ok(None);
    };
    // Seed §10: one query per CV section, the country's name through a LEFT JOIN.
    let education = db
        .query(
            "SELECT e.Id, e.Institution, e.Degree, e.Campus, e.GraduationDate, e.CountryId, c.Name AS CountryName
             FROM Education e LEFT JOIN Country c ON e.CountryId = c.Id WHERE e.PersonId = ? ORDER BY e.Id",
            params![user],
        )?
        .iter()
        .map(|e| EducationItem {
            id: e.int(0),
            institution: e.text(1),
            degree: e.text(2),
            campus: e.text(3),
            graduation_date: e.text(4),
            country_id: e.int(5),
            country_name: e.text(6),
        })
        .collect();
    let experience = db
        .query(
            "SELECT w.Id, w.Company, w.Position, w.StartDate, w.EndDate, w.Description, w.CountryId, c.Name AS CountryName
             FROM WorkExperience w LEFT JOIN Country c ON w.CountryId = c.Id WHERE w.PersonId = ? ORDER BY w.Id",
            params![user],
        )?
        .iter()
        .map(|w| WorkExperienceItem {
            id: w.int(0),
            company: w.text(1),
            position: w.text(2),
            start_date: w.text(3),
            end_date: w.opt_text(4),
            description: w.text(5),
            country_id: w.int(6),
            country_name: w.text(7),
        })
        .collect();
    Ok(Some(ProfileData {
        id: r.int(0),
        first_name: r.text(1),
        last_name: r.text(2),
        user_name: r.text(3),
        email: r.text(4),
        phone: r.text(5),
        picture: r.text(6),
        headline: r.text(7),
        is_online: false,
        last_seen: r.opt_int(8),
        curriculum: CurriculumVitae { education, experience, ..CurriculumVitae::default() },
    }))
}

/// The profile fields a user may change (`UPDATE_MY_PROFILE`).
pub const EDITABLE: &[(&str, &str)] = &[
    ("firstName", "FirstName"),
    ("lastName", "LastName"),
    ("email", "Email"),
    ("phone", "Phone"),
    ("picture", "Picture"),
    ("headline", "Headline"),
];

/// Sets the given `(column, value)` pairs; columns come from [`EDITABLE`] only.
pub fn update_profile(db: &mut DbConn<'_>, user: i64, changes: &[(&str, String)]) -> Result<(), DbError> {
    for (column, value) in changes {
        if !EDITABLE.iter().any(|(_, c)| c == column) {
            continue;
        }
        db.exec(&format!("UPDATE `User` SET {column} = ? WHERE Id = ?"), params![value.as_str(), user])?;
    }
    Ok(())
}

/// Stores a notification; returns it as sent to clients.
pub fn insert_notification(
    db: &mut DbConn<'_>,
    user: i64,
    kind: &str,
    title: &str,
    message: &str,
    payload: Option<&serde_json::Value>,
    now: i64,
) -> Result<NotificationInfo, DbError> {
    let payload_text = payload.map(|p| p.to_string());
    let id = db.insert(
        "INSERT INTO Notification (UserId, Type, Title, Message, CreatedAt, IsRead, Payload) VALUES (?, ?, ?, ?, ?, 0, ?)",
        params![user, kind, title, message, now, payload_text],
    )?;
    Ok(NotificationInfo {
        id: id.to_string(),
        kind: kind.into(),
        title: title.into(),
        message: message.into(),
        timestamp: rfc3339(now),
        is_read: false,
        payload: payload.cloned(),
    })
}

/// The user's notifications, newest first, at most `limit`.
pub fn notifications(
    db: &mut DbConn<'_>,
    user: i64,
    unread_only: bool,
    limit: i64,
) -> Result<Vec<NotificationInfo>, DbError> {
    let rows = db.query(
        "SELECT Id, Type, Title, Message, CreatedAt, IsRead, Payload FROM Notification
         WHERE UserId = ? AND (IsRead = 0 OR ? = 0) ORDER BY Id DESC LIMIT ?",
        params![user, unread_only, limit],
    )?;
    Ok(rows
        .iter()
        .map(|r| NotificationInfo {
            id: r.int(0).to_string(),
            kind: r.text(1),
            title: r.text(2),
            message: r.text(3),
            timestamp: rfc3339(r.int(4)),
            is_read: r.int(5) != 0,
            payload: r.opt_text(6).and_then(|p| serde_json::from_str(&p).ok()),
        })
        .collect())
}

/// Marks one of the user's notifications read; false when the user has no such notification.
pub fn mark_notification_read(db: &mut DbConn<'_>, user: i64, id: i64) -> Result<bool, DbError> {
    let rows = db.query("SELECT IsRead FROM Notification WHERE Id = ? AND UserId = ?", params![id, user])?;
    if rows.is_empty() {
        return Ok(false);
    }
    db.exec("UPDATE Notification SET IsRead = 1 WHERE Id = ? AND UserId = ?", params![id, user])?;
    Ok(true)
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(unix_ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}
