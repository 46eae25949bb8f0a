//! Tool names against patterns: the servers' `tools` globs and the callers' `mcp_tools`
//! allow-lists (`server.tool`, both parts globs). `*` matches any run of characters, `?` one
//! character; everything else matches itself.

/// Whether `name` matches the glob `pattern`.
pub fn matches(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative match with one backtrack point (the last `*`): linear in practice, no recursion.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Whether any pattern matches `name`.
pub fn any(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| matches(p, name))
}

/// A caller's MCP allow-list: `server.tool` globs. Empty allows nothing.
#[derive(Clone, Debug, Default)]
pub struct AllowList {
    /// (server glob, tool glob), split at the first `.`.
    patterns: Vec<(String, String)>,
}

impl AllowList {
    pub fn new(patterns: &[String]) -> AllowList {
        AllowList {
            patterns: patterns
                .iter()
                .filter_map(|p| p.split_once('.'))
                .map(|(s, t)| (s.to_string(), t.to_string()))
                .collect(),
        }
    }

    /// Whether `server`'s `tool` may be seen and called.
    pub fn allows(&self, server: &str, tool: &str) -> bool {
        self.patterns
            .iter()
            .any(|(s, t)| matches(s, server) && matches(t, tool))
    }

    /// Whether some tool of `server` may be: the server is reachable at all.
    pub fn reaches(&self, server: &str) -> bool {
        self.patterns.iter().any(|(s, _)| matches(s, server))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Globs: `*` any run, `?` one character, the rest literal; anchored at both ends.
    #[test]
    fn globs() {
        assert!(matches("*", ""));
        assert!(matches("*", "search"));
        assert!(matches("sea*", "search"));
        assert!(matches("*rch", "search"));
        assert!(matches("s*r*h", "search"));
        assert!(matches("se?rch", "search"));
        assert!(!matches("se?rch", "seaarch"));
        assert!(!matches("search", "search2"));
        assert!(!matches("sea", "search"));
        assert!(!matches("", "x"));
        assert!(matches("a*b*c", "aXbYbZc"));
        assert!(!matches("a*b*c", "aXbYbZ"));
    }

    /// `server.tool` patterns: both halves must match; a server is reached by any pattern.
    #[test]
    fn allow_lists() {
        let a = AllowList::new(&["tickets.*".into(), "wiki.search".into()]);
        assert!(a.allows("tickets", "create"));
        assert!(a.allows("wiki", "search"));
        assert!(!a.allows("wiki", "delete"));
        assert!(!a.allows("other", "search"));
        assert!(a.reaches("wiki"));
        assert!(!a.reaches("other"));
        let none = AllowList::new(&[]);
        assert!(!none.allows("tickets", "create"));
        assert!(!none.reaches("tickets"));
        let all = AllowList::new(&["*.*".into()]);
        assert!(all.allows("x", "y"));
    }
}
