//! The operator's rules (`--rules FILE`, TOML): per glob, what an updated file means
//! for the running processes, overriding the automatic decision. First match wins;
//! the built-in rules come after the operator's, so any of them can be overridden.
//!
//! ```toml
//! [[rule]]
//! glob = "/var/www/**"
//! action = "none"                 # none | auto | reload | restart | exec
//! [[rule]]
//! glob = "/etc/nginx/**"
//! action = "reload"
//! process = "nginx"               # also the processes with this name (see below)
//! [[rule]]
//! glob = "/etc/myapp/*.conf"
//! action = "exec"
//! command = ["/usr/bin/systemctl", "reload", "myapp"]
//! ```
//!
//! Globs are relative to the agent's root (a leading `/` is allowed and means the
//! root); `*` stays within one path component, `**` crosses them. `process` names
//! processes (their `comm`, or their executable's file name) that a `reload` or
//! `restart` also concerns even though the agent never saw them open the file, e.g.
//! because they started before the agent did.
//!
//! This module decides nothing about processes; it only maps a path to an action.

use std::path::{Path, PathBuf};

use globset::{Glob, GlobBuilder, GlobMatcher};
use serde::Deserialize;
use vdsync_proto::RepoPath;

/// What an updated file asks of the processes concerned with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Nothing, whatever the processes do with the file.
    None,
    /// The paper's Table 4: executable, mapped or open → restart; opened before →
    /// verified reload.
    Auto,
    /// SIGHUP every process concerned, verified; a restart where that fails.
    Reload,
    /// Stop before the file is replaced, start after.
    Restart,
    /// Run the rule's command once after the version is in place.
    Exec,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::None => "none",
            Action::Auto => "auto",
            Action::Reload => "reload",
            Action::Restart => "restart",
            Action::Exec => "exec",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot read rules file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rules file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    rule: Vec<RuleText>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleText {
    glob: String,
    action: Action,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    process: Option<String>,
}

/// One rule, compiled.
#[derive(Debug, Clone)]
pub struct Rule {
    /// As written, for messages.
    pub glob: String,
    pub action: Action,
    /// For `exec`: the argv to run (never through a shell).
    pub command: Vec<String>,
    /// For `reload` and `restart`: processes concerned by name as well.
    pub process: Option<String>,
    /// Where the rule comes from: `FILE rule N`, or `built-in`.
    pub origin: String,
    matcher: GlobMatcher,
}

/// The rules in force: the operator's, then the built-in ones.
#[derive(Debug, Clone)]
pub struct Rules {
    rules: Vec<Rule>,
}

/// Web content under the usual document roots: the server reads it per request, so
/// it needs nothing, although the open log shows the server opened it before.
const BUILT_IN_NONE: &[&str] = &[
    "var/www/**",
    "srv/www/**",
    "srv/http/**",
    "usr/share/nginx/html/**",
    "var/lib/nginx/html/**",
];

fn compile(glob: &str) -> Result<GlobMatcher, globset::Error> {
    let relative = glob.trim_start_matches('/');
    GlobBuilder::new(relative)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map(|glob: Glob| glob.compile_matcher())
}

impl Rules {
    /// The built-in rules alone.
    pub fn built_in() -> Rules {
        Rules {
            rules: built_in_rules(),
        }
    }

    /// Reads an operator's rules file; the built-in rules follow its rules.
    pub fn load(path: &Path) -> Result<Rules, RulesError> {
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Rules::parse(&text, path)
    }

    /// Parses the text of a rules file read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Rules, RulesError> {
        let invalid = |message: String| RulesError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let file: RulesFile = toml::from_str(text).map_err(|err| {
            // toml's messages span several lines (a source excerpt); one line is
            // enough to find the mistake.
            let message = err.message().to_string();
            match err.span() {
                Some(span) => invalid(format!(
                    "line {}: {message}",
                    text[..span.start].matches('\n').count() + 1
                )),
                None => invalid(message),
            }
        })?;
        let mut rules = Vec::with_capacity(file.rule.len() + BUILT_IN_NONE.len());
        for (index, rule) in file.rule.into_iter().enumerate() {
            let number = index + 1;
            let matcher = compile(&rule.glob).map_err(|err| {
                invalid(format!("rule {number}: bad glob {:?}: {err}", rule.glob))
            })?;
            let command = match (rule.action, rule.command) {
                (Action::Exec, Some(command)) if !command.is_empty() => command,
                (Action::Exec, _) => {
                    return Err(invalid(format!(
                        "rule {number}: action \"exec\" needs a non-empty `command`"
                    )))
                }
                (_, Some(_)) => {
                    return Err(invalid(format!(
                        "rule {number}: `command` only goes with action \"exec\""
                    )))
                }
                (_, None) => Vec::new(),
            };
            if rule.process.is_some() && !matches!(rule.action, Action::Reload | Action::Restart) {
                return Err(invalid(format!(
                    "rule {number}: `process` only goes with action \"reload\" or \"restart\""
                )));
            }
            if command
                .first()
                .is_some_and(|program| !program.starts_with('/'))
            {
                return Err(invalid(format!(
                    "rule {number}: the command must start with an absolute path (no PATH search as root)"
                )));
            }
            rules.push(Rule {
                glob: rule.glob,
                action: rule.action,
                command,
                process: rule.process,
                origin: format!("{} rule {number}", path.display()),
                matcher,
            });
        }
        rules.extend(built_in_rules());
        Ok(Rules { rules })
    }

    /// The first rule matching `path`, if any; no match means [`Action::Auto`].
    pub fn matching(&self, path: &RepoPath) -> Option<&Rule> {
        let text = String::from_utf8_lossy(path.as_bytes());
        self.rules
            .iter()
            .find(|rule| rule.matcher.is_match(text.as_ref()))
    }

    /// The action for `path`.
    pub fn action(&self, path: &RepoPath) -> Action {
        self.matching(path).map_or(Action::Auto, |rule| rule.action)
    }
}

fn built_in_rules() -> Vec<Rule> {
    // The built-in globs are constants; a test checks every one compiles.
    BUILT_IN_NONE
        .iter()
        .filter_map(|glob| {
            compile(glob).ok().map(|matcher| Rule {
                glob: format!("/{glob}"),
                action: Action::None,
                command: Vec::new(),
                process: None,
                origin: "built-in".to_string(),
                matcher,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdsync_proto::fixtures::path;

    fn parse(text: &str) -> Result<Rules, String> {
        Rules::parse(text, Path::new("rules.toml")).map_err(|err| err.to_string())
    }

    #[test]
    fn built_in_rules_all_compile_and_leave_web_content_alone() {
        assert_eq!(Rules::built_in().rules.len(), BUILT_IN_NONE.len());
        let rules = Rules::built_in();
        assert_eq!(rules.action(&path("var/www/html/index.html")), Action::None);
        assert_eq!(
            rules.action(&path("usr/share/nginx/html/a/b.css")),
            Action::None
        );
        assert_eq!(rules.action(&path("etc/nginx/nginx.conf")), Action::Auto);
        assert_eq!(rules.action(&path("var/wwwx/index.html")), Action::Auto);
    }

    #[test]
    fn first_match_wins_and_operator_rules_come_before_built_ins() {
        let rules = parse(
            r#"
            [[rule]]
            glob = "/var/www/app/*.py"
            action = "restart"
            [[rule]]
            glob = "/etc/myapp/*.conf"
            action = "exec"
            command = ["/usr/bin/systemctl", "reload", "myapp"]
            [[rule]]
            glob = "etc/**"
            action = "reload"
            process = "nginx"
            "#,
        )
        .unwrap();
        let check = |p: &str, expected: Action| {
            assert_eq!(rules.action(&path(p)), expected, "{p}");
        };
        check("var/www/app/main.py", Action::Restart);
        check("var/www/app/sub/main.py", Action::None);
        check("etc/myapp/a.conf", Action::Exec);
        check("etc/myapp/sub/a.conf", Action::Reload);
        check("usr/bin/thing", Action::Auto);
        let exec = rules.matching(&path("etc/myapp/a.conf")).unwrap();
        assert_eq!(exec.command, ["/usr/bin/systemctl", "reload", "myapp"]);
        assert_eq!(exec.origin, "rules.toml rule 2");
        let reload = rules.matching(&path("etc/x")).unwrap();
        assert_eq!(reload.process.as_deref(), Some("nginx"));
    }

    #[test]
    fn bad_rules_get_one_line_naming_the_rule() {
        let cases = [
            (
                "[[rule]]\nglob = \"a\"\naction = \"explode\"\n",
                "line 3: unknown variant `explode`",
            ),
            (
                "[[rule]]\nglob = \"a\"\naction = \"exec\"\n",
                "rule 1: action \"exec\" needs a non-empty `command`",
            ),
            (
                "[[rule]]\nglob = \"a\"\naction = \"exec\"\ncommand = []\n",
                "rule 1: action \"exec\" needs",
            ),
            (
                "[[rule]]\nglob = \"a\"\naction = \"none\"\ncommand = [\"/bin/true\"]\n",
                "`command` only goes with action \"exec\"",
            ),
            (
                "[[rule]]\nglob = \"a\"\naction = \"none\"\nprocess = \"x\"\n",
                "`process` only goes with",
            ),
            (
                "[[rule]]\nglob = \"a\"\naction = \"exec\"\ncommand = [\"systemctl\"]\n",
                "must start with an absolute path",
            ),
            (
                "[[rule]]\nglob = \"a[\"\naction = \"none\"\n",
                "rule 1: bad glob",
            ),
            (
                "[[rule]]\nglob = \"a\"\naction = \"none\"\ncolour = 1\n",
                "unknown field `colour`",
            ),
            ("[[rules]]\nglob = \"a\"\n", "unknown field `rules`"),
        ];
        for (text, expected) in cases {
            let message = parse(text).unwrap_err();
            assert!(message.starts_with("rules file rules.toml: "), "{message}");
            assert!(
                message.contains(expected),
                "{message:?} should contain {expected:?}"
            );
            assert!(!message.contains('\n'), "{message:?} spans lines");
        }
    }

    #[test]
    fn an_empty_file_means_the_built_in_rules() {
        let rules = parse("").unwrap();
        assert_eq!(rules.rules.len(), BUILT_IN_NONE.len());
    }
}
