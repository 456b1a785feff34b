//! `RepoPath`: a path relative to a machine's root, parsed so that it cannot escape it.
//!
//! Every path that arrives from the wire, a changeset or a rules file becomes a
//! `RepoPath` before anything else looks at it. The type cannot hold an empty
//! component, `.` or `..`, a leading `/` or a NUL byte, so code that joins it onto a
//! root never has to re-check. Names are bytes, not strings: Linux file names need
//! not be UTF-8, and vdsync ships them unchanged.

use std::cmp::Ordering;
use std::fmt;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a byte string is not a valid [`RepoPath`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path {0:?} is absolute; paths are relative to the root")]
    Absolute(String),
    #[error("path {0:?} has an empty component")]
    EmptyComponent(String),
    #[error("path {0:?} has a `.` or `..` component")]
    DotComponent(String),
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    #[error("hex path {0:?} is not valid hex")]
    BadHex(String),
}

/// A normalized relative path: one or more `/`-separated components, none of them
/// empty, `.` or `..`, and no NUL anywhere.
///
/// Ordering is component by component, so a directory sorts directly before
/// everything below it (`a`, `a/b`, `a b`): applying entries in order creates parents
/// before children.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RepoPath(Vec<u8>);

impl RepoPath {
    /// Parses bytes such as `etc/nginx/nginx.conf`.
    pub fn parse(bytes: &[u8]) -> Result<RepoPath, PathError> {
        let lossy = || String::from_utf8_lossy(bytes).into_owned();
        if bytes.is_empty() {
            return Err(PathError::Empty);
        }
        if bytes.contains(&0) {
            return Err(PathError::Nul(lossy()));
        }
        if bytes[0] == b'/' {
            return Err(PathError::Absolute(lossy()));
        }
        for component in bytes.split(|&b| b == b'/') {
            match component {
                b"" => return Err(PathError::EmptyComponent(lossy())),
                b"." | b".." => return Err(PathError::DotComponent(lossy())),
                _ => {}
            }
        }
        Ok(RepoPath(bytes.to_vec()))
    }

    /// Parses a path given as text (rules files, command lines).
    pub fn parse_str(text: &str) -> Result<RepoPath, PathError> {
        RepoPath::parse(text.as_bytes())
    }

    /// The raw bytes, `/`-separated.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The components, first to last.
    pub fn components(&self) -> impl Iterator<Item = &[u8]> + Clone {
        self.0.split(|&b| b == b'/')
    }

    /// The last component.
    pub fn file_name(&self) -> &[u8] {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(slash) => &self.0[slash + 1..],
            None => &self.0,
        }
    }

    /// The path without its last component; `None` for a top-level name.
    pub fn parent(&self) -> Option<RepoPath> {
        self.0
            .iter()
            .rposition(|&b| b == b'/')
            .map(|slash| RepoPath(self.0[..slash].to_vec()))
    }

    /// Appends one file name. Fails if `name` is not a single valid component.
    pub fn join(&self, name: &[u8]) -> Result<RepoPath, PathError> {
        let mut joined = self.0.clone();
        joined.push(b'/');
        joined.extend_from_slice(name);
        if name.contains(&b'/') || name.is_empty() {
            return Err(PathError::EmptyComponent(
                String::from_utf8_lossy(&joined).into_owned(),
            ));
        }
        RepoPath::parse(&joined)
    }

    /// True if `self` is `ancestor` or lies below it.
    pub fn starts_with(&self, ancestor: &RepoPath) -> bool {
        self.0.starts_with(&ancestor.0)
            && (self.0.len() == ancestor.0.len() || self.0[ancestor.0.len()] == b'/')
    }

    /// Number of components.
    pub fn depth(&self) -> usize {
        self.components().count()
    }
}

impl Ord for RepoPath {
    fn cmp(&self, other: &Self) -> Ordering {
        self.components().cmp(other.components())
    }
}

impl PartialOrd for RepoPath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Shows the path as text, escaping bytes that are not printable UTF-8 so that a
/// name with a newline still prints on one line.
impl fmt::Display for RepoPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.escape_ascii_utf8())
    }
}

impl fmt::Debug for RepoPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RepoPath({self})")
    }
}

/// Escaping that keeps printable UTF-8 (so `café` stays readable) but shows control
/// characters and invalid bytes as `\n`, `\xff`.
trait EscapeUtf8 {
    fn escape_ascii_utf8(&self) -> String;
}

impl EscapeUtf8 for [u8] {
    fn escape_ascii_utf8(&self) -> String {
        let mut out = String::with_capacity(self.len());
        for chunk in self.utf8_chunks() {
            for ch in chunk.valid().chars() {
                if ch.is_control() || ch == '\\' {
                    out.extend(ch.escape_default());
                } else {
                    out.push(ch);
                }
            }
            for byte in chunk.invalid() {
                out.push_str(&format!("\\x{byte:02x}"));
            }
        }
        out
    }
}

/// Serialized as a JSON string when the bytes are UTF-8, else as `{"hex": "..."}`.
/// Deserializing parses, so a changeset holding `../etc/passwd` is refused while it is
/// being read.
impl Serialize for RepoPath {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        WireBytes::from_bytes(&self.0).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for RepoPath {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = WireBytes::deserialize(deserializer)?
            .into_bytes()
            .map_err(D::Error::custom)?;
        RepoPath::parse(&bytes).map_err(D::Error::custom)
    }
}

/// Bytes on the wire: text when they are UTF-8, hex otherwise.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum WireBytes {
    Text(String),
    Hex { hex: String },
}

impl WireBytes {
    pub(crate) fn from_bytes(bytes: &[u8]) -> WireBytes {
        match std::str::from_utf8(bytes) {
            Ok(text) => WireBytes::Text(text.to_owned()),
            Err(_) => WireBytes::Hex {
                hex: crate::hex::encode(bytes),
            },
        }
    }

    pub(crate) fn into_bytes(self) -> Result<Vec<u8>, PathError> {
        match self {
            WireBytes::Text(text) => Ok(text.into_bytes()),
            WireBytes::Hex { hex } => crate::hex::decode(&hex).ok_or(PathError::BadHex(hex)),
        }
    }
}

/// Serde helper for raw byte strings (symlink targets, xattr values) in the same
/// text-or-hex form as paths.
pub mod wire_bytes {
    use super::WireBytes;
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        WireBytes::from_bytes(bytes).serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        WireBytes::deserialize(deserializer)?
            .into_bytes()
            .map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &[u8], expected: Result<&str, &str>) {
        let parsed = RepoPath::parse(input);
        match (parsed, expected) {
            (Ok(path), Ok(display)) => assert_eq!(path.to_string(), display),
            (Err(err), Err(message)) => assert_eq!(err.to_string(), message),
            (got, want) => panic!("parse({input:?}) = {got:?}, expected {want:?}"),
        }
    }

    #[test]
    fn parses_and_refuses() {
        check(b"etc/nginx/nginx.conf", Ok("etc/nginx/nginx.conf"));
        check(b"with space/and\nnewline", Ok("with space/and\\nnewline"));
        check(b"bad\xffbyte", Ok("bad\\xffbyte"));
        check(b"..hidden/x..", Ok("..hidden/x.."));
        check(b"", Err("path is empty"));
        check(
            b"/etc/passwd",
            Err("path \"/etc/passwd\" is absolute; paths are relative to the root"),
        );
        check(
            b"a/../../etc",
            Err("path \"a/../../etc\" has a `.` or `..` component"),
        );
        check(b"..", Err("path \"..\" has a `.` or `..` component"));
        check(b"a/./b", Err("path \"a/./b\" has a `.` or `..` component"));
        check(b"a//b", Err("path \"a//b\" has an empty component"));
        check(b"a/", Err("path \"a/\" has an empty component"));
        check(b"a\0b", Err("path \"a\\0b\" contains a NUL byte"));
    }

    #[test]
    fn parents_sort_before_children() {
        let mut paths: Vec<RepoPath> = ["a b", "a/b", "a", "a-b", "a/b/c"]
            .iter()
            .map(|p| RepoPath::parse_str(p).unwrap())
            .collect();
        paths.sort();
        let shown: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        assert_eq!(shown, ["a", "a/b", "a/b/c", "a b", "a-b"]);
    }

    #[test]
    fn relations() {
        let path = RepoPath::parse_str("a/b/c").unwrap();
        assert_eq!(path.parent().unwrap().to_string(), "a/b");
        assert_eq!(path.file_name(), b"c");
        assert!(path.starts_with(&RepoPath::parse_str("a/b").unwrap()));
        assert!(!path.starts_with(&RepoPath::parse_str("a/bc").unwrap()));
        assert!(RepoPath::parse_str("a").unwrap().parent().is_none());
        assert!(path.join(b"..").is_err());
        assert!(path.join(b"x/y").is_err());
    }

    #[test]
    fn wire_round_trip_and_refusal() {
        let odd = RepoPath::parse(b"dir/n\xffame").unwrap();
        let json = serde_json::to_string(&odd).unwrap();
        assert_eq!(json, r#"{"hex":"6469722f6eff616d65"}"#);
        assert_eq!(serde_json::from_str::<RepoPath>(&json).unwrap(), odd);
        let refused = serde_json::from_str::<RepoPath>(r#""../../etc/shadow""#);
        assert!(refused.is_err());
        let refused = serde_json::from_str::<RepoPath>(r#"{"hex":"2f6574632f706173737764"}"#);
        assert!(refused.unwrap_err().to_string().contains("absolute"));
    }
}
