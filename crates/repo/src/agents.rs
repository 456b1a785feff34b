//! The fleet registry's rules: which agent names are acceptable, and how a hello or a
//! report changes what the repository remembers about an agent.
//!
//! These are pure functions over `AgentInfo`; reading and writing the registry is the
//! `Repository`'s job.

use vdsync_proto::wire::{AgentInfo, Hello, Outcome, OutcomeStatus};

use crate::RepoError;

/// The longest agent name accepted.
pub const MAX_AGENT_NAME_LEN: usize = 128;

/// Accepts 1 to 128 characters of `[A-Za-z0-9._-]`.
///
/// Names appear in URLs, logs and `vdsync fleet` tables, so they are kept to
/// characters that need no escaping anywhere. `.` and `..` alone are refused too,
/// because a name may one day become a file name.
pub fn validate_agent_name(name: &str) -> Result<(), RepoError> {
    let allowed_character =
        |character: char| character.is_ascii_alphanumeric() || matches!(character, '.' | '_' | '-');
    let acceptable = !name.is_empty()
        && name.len() <= MAX_AGENT_NAME_LEN
        && name.chars().all(allowed_character)
        && name != "."
        && name != "..";
    if acceptable {
        Ok(())
    } else {
        Err(RepoError::InvalidAgentName(name.to_owned()))
    }
}

/// The record after a hello: the version the agent says it is at, and the previous
/// outcome kept so that `vdsync fleet` still shows how the last version went.
pub fn after_hello(
    previous: Option<AgentInfo>,
    name: &str,
    hello: &Hello,
    now_unix_seconds: u64,
) -> AgentInfo {
    AgentInfo {
        name: name.to_owned(),
        version: hello.version,
        last_seen: now_unix_seconds,
        last_outcome: previous.and_then(|previous| previous.last_outcome),
    }
}

/// The record after a report: a version counts as the agent's only once applied, so
/// a failed version leaves the previous one in place.
pub fn after_report(
    previous: Option<AgentInfo>,
    name: &str,
    outcome: &Outcome,
    now_unix_seconds: u64,
) -> AgentInfo {
    let previous_version = previous.and_then(|previous| previous.version);
    let version = match outcome.status {
        OutcomeStatus::Applied => Some(outcome.version),
        OutcomeStatus::Failed => previous_version,
    };
    AgentInfo {
        name: name.to_owned(),
        version,
        last_seen: now_unix_seconds,
        last_outcome: Some(outcome.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_name(name: &str, accepted: bool) {
        assert_eq!(
            validate_agent_name(name).is_ok(),
            accepted,
            "validate_agent_name({name:?})"
        );
    }

    #[test]
    fn agent_names() {
        check_name("web-01", true);
        check_name("db_2.eu-west", true);
        check_name(&"a".repeat(128), true);
        check_name(&"a".repeat(129), false);
        check_name("", false);
        check_name(".", false);
        check_name("..", false);
        check_name("has space", false);
        check_name("slash/name", false);
        check_name("café", false);
        check_name("new\nline", false);
    }

    fn outcome(version: u64, status: OutcomeStatus) -> Outcome {
        Outcome {
            version,
            status,
            files: 1,
            removed: 0,
            bytes_fetched: 10,
            duration_ms: 5,
            recovered: false,
            warnings: vec![],
            error: None,
            processes: Vec::new(),
        }
    }

    #[test]
    fn hello_keeps_the_last_outcome() {
        let first = after_hello(None, "a", &Hello { version: None }, 10);
        assert_eq!(first.version, None);
        assert_eq!(first.last_outcome, None);
        let reported = after_report(Some(first), "a", &outcome(3, OutcomeStatus::Applied), 20);
        let again = after_hello(Some(reported), "a", &Hello { version: Some(3) }, 30);
        assert_eq!(again.version, Some(3));
        assert_eq!(again.last_seen, 30);
        assert_eq!(again.last_outcome, Some(outcome(3, OutcomeStatus::Applied)));
    }

    #[test]
    fn failed_report_keeps_the_version() {
        let applied = after_report(None, "a", &outcome(4, OutcomeStatus::Applied), 1);
        assert_eq!(applied.version, Some(4));
        let failed = after_report(Some(applied), "a", &outcome(5, OutcomeStatus::Failed), 2);
        assert_eq!(failed.version, Some(4));
        assert_eq!(failed.last_seen, 2);
        assert_eq!(failed.last_outcome, Some(outcome(5, OutcomeStatus::Failed)));
        let never_applied = after_report(None, "b", &outcome(5, OutcomeStatus::Failed), 3);
        assert_eq!(never_applied.version, None);
    }
}
