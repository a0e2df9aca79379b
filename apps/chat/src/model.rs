//! The payloads of seed 002 §8 (`ChatInfo`, `NotificationInfo`, `ProfileData`) and the
//! connection's user data (§8.1 `WsUserData`), with the seed's JSON names.

use serde::{Deserialize, Serialize};

/// What every connection carries from authentication (seed `WsUserData`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WsUserData {
    /// User id.
    pub id: i64,
    /// `username`.
    pub username: String,
    /// `firstName`.
    #[serde(rename = "firstName")]
    pub first_name: String,
    /// `lastName`.
    #[serde(rename = "lastName")]
    pub last_name: String,
}

/// One conversation in `CHAT_LIST` (seed `ChatInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatInfo {
    /// `chatId`.
    pub chat_id: String,
    /// The contact.
    pub other_user_id: i64,
    /// The contact's user name.
    pub other_user_name: String,
    /// The contact's first name.
    pub other_first_name: String,
    /// The contact's last name.
    pub other_last_name: String,
    /// The contact's picture URL.
    pub other_picture: String,
    /// Whether the contact has a connection now.
    pub is_other_online: bool,
    /// The newest message's text ("" when none).
    pub last_message: String,
    /// The newest message's time, Unix ms (0 when none).
    pub last_message_ts: i64,
    /// Messages to me in this chat not yet read.
    pub unread_count: i64,
}

/// One notification (seed `NotificationInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotificationInfo {
    /// Id (a decimal string, as in the seed).
    pub id: String,
    /// `profile_view`, `welcome`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// Title.
    pub title: String,
    /// Text.
    pub message: String,
    /// RFC 3339 UTC (Go's `time.Time` JSON).
    pub timestamp: String,
    /// Read already.
    pub is_read: bool,
    /// Details, type-specific.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
}

/// One education item; `country_name` comes from a `LEFT JOIN Country` (seed §10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EducationItem {
    /// Id.
    pub id: i64,
    /// School.
    pub institution: String,
    /// Degree.
    pub degree: String,
    /// Campus.
    pub campus: String,
    /// Graduation date (`YYYY-MM-DD`).
    pub graduation_date: String,
    /// `country_id` (0: none).
    #[serde(rename = "country_id")]
    pub country_id: i64,
    /// `country_name`, omitted when empty (seed §10 `json:"country_name,omitempty"`).
    #[serde(rename = "country_name", default, skip_serializing_if = "String::is_empty")]
    pub country_name: String,
}

/// One work-experience item, with `country_name` like [`EducationItem`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkExperienceItem {
    /// Id.
    pub id: i64,
    /// Employer.
    pub company: String,
    /// Role.
    pub position: String,
    /// Start (`YYYY-MM-DD`).
    pub start_date: String,
    /// End, `null` while current.
    pub end_date: Option<String>,
    /// Description.
    pub description: String,
    /// `country_id` (0: none).
    #[serde(rename = "country_id")]
    pub country_id: i64,
    /// `country_name`, omitted when empty.
    #[serde(rename = "country_name", default, skip_serializing_if = "String::is_empty")]
    pub country_name: String,
}

/// The CV part of a profile (seed `CurriculumVitae`); sections the schema does not store yet
/// are empty lists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurriculumVitae {
    /// Education.
    pub education: Vec<EducationItem>,
    /// Work experience.
    pub experience: Vec<WorkExperienceItem>,
    /// Not stored yet: always empty.
    pub certifications: Vec<serde_json::Value>,
    /// Not stored yet: always empty.
    pub skills: Vec<serde_json::Value>,
    /// Not stored yet: always empty.
    pub languages: Vec<serde_json::Value>,
    /// Not stored yet: always empty.
    pub projects: Vec<serde_json::Value>,
}

/// `MY_PROFILE_DATA` / `USER_PROFILE_DATA` payload (seed `ProfileData`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProfileData {
    /// User id.
    pub id: i64,
    /// First name.
    pub first_name: String,
    /// Last name.
    pub last_name: String,
    /// User name.
    pub user_name: String,
    /// E-mail ("" unless it is my profile or a contact's).
    pub email: String,
    /// Phone ("" unless it is my profile or a contact's).
    pub phone: String,
    /// Picture URL.
    pub picture: String,
    /// One-line professional headline.
    pub headline: String,
    /// Online now (always false for non-contacts: presence is for contacts only).
    pub is_online: bool,
    /// Last disconnect, Unix ms, for contacts (null otherwise or never).
    pub last_seen: Option<i64>,
    /// Education and experience.
    pub curriculum: CurriculumVitae,
}
