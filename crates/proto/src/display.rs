//! Small text helpers every crate's error messages share.

/// A version for a message: its number, or `none` before version 0 exists.
pub fn show_version(version: &Option<u64>) -> String {
    version.map_or_else(|| "none".to_owned(), |number| number.to_string())
}

/// The error's message followed by every `source`, joined by `: `, as one line for a
/// report, a log or an error body.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_and_chains() {
        assert_eq!(super::show_version(&None), "none");
        assert_eq!(super::show_version(&Some(7)), "7");
        let inner = std::io::Error::other("disk on fire");
        let outer = std::io::Error::other(Wrapper(inner));
        assert_eq!(super::error_chain(&outer), "wrapped: disk on fire");
    }

    #[derive(Debug)]
    struct Wrapper(std::io::Error);

    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrapped")
        }
    }

    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
