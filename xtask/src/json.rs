//! A small JSON reader for the `--json` output of `vdsync push`, `log` and `fleet`.
//!
//! It exists so xtask stays std + anyhow only (see Cargo.toml). It reads complete,
//! well-formed documents into a tree and offers the few lookups the tasks need; it is not
//! a general-purpose or streaming parser, and it never writes JSON.

use anyhow::{bail, Context, Result};

/// One JSON value. Numbers keep their text so integers such as byte counts above 2^53
/// are read exactly, which an `f64` would not guarantee.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonValue {
    Null,
    Bool(bool),
    Number(String),
    String(String),
    Array(Vec<JsonValue>),
    /// Members in document order; the tasks look up a handful of keys, so a map buys nothing.
    Object(Vec<(String, JsonValue)>),
}

impl JsonValue {
    /// The member `key` of an object; `None` for a missing key or a non-object.
    pub fn get(&self, key: &str) -> Option<&JsonValue> {
        match self {
            JsonValue::Object(members) => members
                .iter()
                .find(|(member_key, _)| member_key == key)
                .map(|(_, value)| value),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            JsonValue::Number(text) => text.parse().ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            JsonValue::String(text) => Some(text),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[JsonValue]> {
        match self {
            JsonValue::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// Parses one complete JSON document (surrounding whitespace allowed).
pub fn parse(text: &str) -> Result<JsonValue> {
    let mut parser = Parser {
        bytes: text.as_bytes(),
        position: 0,
    };
    let value = parser.value(0)?;
    parser.skip_whitespace();
    if parser.position != parser.bytes.len() {
        bail!(
            "unexpected text after the JSON value at byte {}",
            parser.position
        );
    }
    Ok(value)
}

/// Deep enough for anything vdsync prints, shallow enough that hostile input cannot
/// overflow the stack through recursion.
const MAXIMUM_NESTING: usize = 64;

struct Parser<'text> {
    bytes: &'text [u8],
    position: usize,
}

impl Parser<'_> {
    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.position) {
            self.position += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.position).copied()
    }

    fn expect_byte(&mut self, expected: u8) -> Result<()> {
        match self.peek() {
            Some(found) if found == expected => {
                self.position += 1;
                Ok(())
            }
            Some(found) => bail!(
                "expected {:?} but found {:?} at byte {}",
                expected as char,
                found as char,
                self.position
            ),
            None => bail!("expected {:?} but the JSON ended", expected as char),
        }
    }

    fn expect_word(&mut self, word: &str, value: JsonValue) -> Result<JsonValue> {
        if self.bytes[self.position..].starts_with(word.as_bytes()) {
            self.position += word.len();
            Ok(value)
        } else {
            bail!("invalid literal at byte {}", self.position)
        }
    }

    fn value(&mut self, depth: usize) -> Result<JsonValue> {
        if depth > MAXIMUM_NESTING {
            bail!("JSON nested deeper than {MAXIMUM_NESTING} levels");
        }
        self.skip_whitespace();
        match self.peek() {
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => self.string().map(JsonValue::String),
            Some(b't') => self.expect_word("true", JsonValue::Bool(true)),
            Some(b'f') => self.expect_word("false", JsonValue::Bool(false)),
            Some(b'n') => self.expect_word("null", JsonValue::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(other) => bail!("unexpected {:?} at byte {}", other as char, self.position),
            None => bail!("the JSON ended where a value was expected"),
        }
    }

    fn object(&mut self, depth: usize) -> Result<JsonValue> {
        self.expect_byte(b'{')?;
        let mut members = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.position += 1;
            return Ok(JsonValue::Object(members));
        }
        loop {
            self.skip_whitespace();
            let key = self.string()?;
            self.skip_whitespace();
            self.expect_byte(b':')?;
            let value = self.value(depth + 1)?;
            members.push((key, value));
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.position += 1,
                Some(b'}') => {
                    self.position += 1;
                    return Ok(JsonValue::Object(members));
                }
                _ => bail!("expected ',' or '}}' at byte {}", self.position),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<JsonValue> {
        self.expect_byte(b'[')?;
        let mut items = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.position += 1;
            return Ok(JsonValue::Array(items));
        }
        loop {
            items.push(self.value(depth + 1)?);
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.position += 1,
                Some(b']') => {
                    self.position += 1;
                    return Ok(JsonValue::Array(items));
                }
                _ => bail!("expected ',' or ']' at byte {}", self.position),
            }
        }
    }

    fn number(&mut self) -> Result<JsonValue> {
        let start = self.position;
        while let Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') = self.peek() {
            self.position += 1;
        }
        let text = std::str::from_utf8(&self.bytes[start..self.position])
            .context("number is not UTF-8")?;
        // Checking through f64 rejects malformed text such as "1-2" or "--1".
        if text.parse::<f64>().is_err() {
            bail!("invalid number {text:?} at byte {start}");
        }
        Ok(JsonValue::Number(text.to_owned()))
    }

    fn string(&mut self) -> Result<String> {
        self.expect_byte(b'"')?;
        let mut decoded = Vec::new();
        loop {
            let Some(byte) = self.peek() else {
                bail!("unterminated string");
            };
            self.position += 1;
            match byte {
                b'"' => break,
                b'\\' => {
                    let Some(escape) = self.peek() else {
                        bail!("unterminated escape");
                    };
                    self.position += 1;
                    let replacement = match escape {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode_escape()?,
                        other => bail!(
                            "invalid escape \\{} at byte {}",
                            other as char,
                            self.position
                        ),
                    };
                    let mut buffer = [0; 4];
                    decoded.extend_from_slice(replacement.encode_utf8(&mut buffer).as_bytes());
                }
                other => decoded.push(other),
            }
        }
        String::from_utf8(decoded).context("string is not UTF-8")
    }

    /// Decodes the XXXX of `\uXXXX` (the `\u` already consumed), joining a UTF-16
    /// surrogate pair when one follows.
    fn unicode_escape(&mut self) -> Result<char> {
        let first = self.four_hex_digits()?;
        let code_point = if (0xD800..0xDC00).contains(&first) {
            if !self.bytes[self.position..].starts_with(b"\\u") {
                bail!("unpaired surrogate at byte {}", self.position);
            }
            self.position += 2;
            let second = self.four_hex_digits()?;
            if !(0xDC00..0xE000).contains(&second) {
                bail!("invalid low surrogate at byte {}", self.position);
            }
            0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
        } else {
            first
        };
        char::from_u32(code_point).with_context(|| format!("invalid code point {code_point:#x}"))
    }

    fn four_hex_digits(&mut self) -> Result<u32> {
        let digits = self
            .bytes
            .get(self.position..self.position + 4)
            .context("truncated \\u escape")?;
        let text = std::str::from_utf8(digits).context("invalid \\u escape")?;
        let value = u32::from_str_radix(text, 16)
            .with_context(|| format!("invalid \\u escape {text:?}"))?;
        self.position += 4;
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fleet_output() {
        let fleet = parse(
            r#"[
  {
    "name": "web-1",
    "version": 1,
    "last_seen": 1700000000,
    "last_outcome": {"version": 1, "status": "applied", "warnings": [], "error": null, "recovered": false}
  },
  {"name": "web-2", "version": null, "last_seen": 0, "last_outcome": null}
]"#,
        )
        .unwrap();
        let agents = fleet.as_array().unwrap();
        assert_eq!(agents[0].get("name").unwrap().as_str(), Some("web-1"));
        assert_eq!(agents[0].get("version").unwrap().as_u64(), Some(1));
        assert_eq!(
            agents[0]
                .get("last_outcome")
                .unwrap()
                .get("status")
                .unwrap()
                .as_str(),
            Some("applied")
        );
        assert_eq!(agents[1].get("version"), Some(&JsonValue::Null));
    }

    #[test]
    fn reads_large_integers_exactly_and_escapes() {
        let value = parse(
            r#"{"bytes_sent": 18446744073709551615, "message": "a\"b\\c\u00e9\ud83d\ude00"}"#,
        )
        .unwrap();
        assert_eq!(value.get("bytes_sent").unwrap().as_u64(), Some(u64::MAX));
        assert_eq!(
            value.get("message").unwrap().as_str(),
            Some("a\"b\\c\u{e9}\u{1f600}")
        );
    }

    #[test]
    fn rejects_malformed_documents() {
        for malformed in [
            "",
            "{",
            "[1,]",
            "{\"a\" 1}",
            "tru",
            "1 2",
            "\"abc",
            "--1",
            "\"\\x\"",
        ] {
            assert!(parse(malformed).is_err(), "accepted {malformed:?}");
        }
    }
}
