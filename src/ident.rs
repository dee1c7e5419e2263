//! Table, column and view names from the config: parsed once, always quoted.
//!
//! A name is used exactly as written (case-sensitive) and always sent to the database
//! as a quoted identifier, so quotes, semicolons, spaces or comment markers in it can
//! never become SQL. `schema.table` splits at the first dot outside double quotes;
//! inside double quotes `""` stands for one `"`.

use std::fmt;

/// A `where` from the config is not one self-contained expression (see
/// [`check_expression`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpressionError {
    #[error("has an unterminated {0}")]
    Unterminated(&'static str),
    #[error("closes a parenthesis it did not open; it must be one expression")]
    ClosesUnopened,
    #[error("contains `;`; it must be one expression, not statements")]
    Semicolon,
    #[error("leaves a parenthesis open")]
    LeftOpen,
}

/// A table or view name from the config cannot be parsed (see [`QualifiedName::parse`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("\"{0}\" has an unclosed double quote")]
    UnclosedQuote(String),
    #[error("\"{0}\": text after a closing double quote; quote the whole name")]
    AfterQuote(String),
    #[error("\"{0}\" is not a valid name; write table or schema.table")]
    Empty(String),
}

// The config reports both as the message of the key they are about.
impl From<ExpressionError> for String {
    fn from(e: ExpressionError) -> Self {
        e.to_string()
    }
}

impl From<NameError> for String {
    fn from(e: NameError) -> Self {
        e.to_string()
    }
}

/// `[schema.]name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QualifiedName {
    pub schema: Option<String>,
    pub name: String,
}

/// Quotes an identifier: `a"b` becomes `"a""b"`.
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quotes a string literal: `it's` becomes `'it''s'` (for values we must splice, such
/// as a time zone name inside an expression that is reused across statements).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Checks that `sql` is one self-contained expression as far as its brackets go: the
/// parentheses outside string literals, quoted identifiers, dollar quotes and comments
/// balance without ever closing more than they opened, there is no `;`, and nothing
/// is left unterminated. dbkeeper splices a rule's `where` into its own statements as
/// `… AND (<where>)`; text like `a = 1) OR (true` would otherwise escape the brackets
/// and turn the expiry predicate off.
pub fn check_expression(sql: &str) -> Result<(), ExpressionError> {
    let chars: Vec<char> = sql.chars().collect();
    let mut depth = 0i64;
    let mut i = 0;
    let unterminated = |what: &'static str| Err(ExpressionError::Unterminated(what));
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            '\'' => {
                // E'…' strings take backslash escapes; every string takes ''.
                let escapes = i > 0 && matches!(chars[i - 1], 'e' | 'E');
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return unterminated("string literal"),
                        Some('\\') if escapes => i += 2,
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => i += 2,
                        Some('\'') => break,
                        Some(_) => i += 1,
                    }
                }
            }
            '"' => {
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return unterminated("quoted identifier"),
                        Some('"') if chars.get(i + 1) == Some(&'"') => i += 2,
                        Some('"') => break,
                        Some(_) => i += 1,
                    }
                }
            }
            '-' if next == Some('-') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if next == Some('*') => {
                // PostgreSQL nests block comments.
                let mut nested = 1;
                i += 2;
                while nested > 0 {
                    match (chars.get(i), chars.get(i + 1)) {
                        (None, _) => return unterminated("comment"),
                        (Some('/'), Some('*')) => {
                            nested += 1;
                            i += 2
                        }
                        (Some('*'), Some('/')) => {
                            nested -= 1;
                            i += 2
                        }
                        _ => i += 1,
                    }
                }
                continue;
            }
            '$' => {
                // $tag$ … $tag$ (a $1 parameter has no closing $).
                let tag_end = chars[i + 1..]
                    .iter()
                    .position(|&ch| !(ch.is_alphanumeric() || ch == '_'))
                    .map(|p| i + 1 + p);
                if let Some(end) = tag_end.filter(|&e| chars[e] == '$') {
                    let tag: String = chars[i..=end].iter().collect();
                    let rest: String = chars[end + 1..].iter().collect();
                    match rest.find(&tag) {
                        Some(at) => i = end + 1 + rest[..at].chars().count() + tag.chars().count(),
                        None => return unterminated("dollar-quoted string"),
                    }
                    continue;
                }
            }
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(ExpressionError::ClosesUnopened);
                }
            }
            ';' => return Err(ExpressionError::Semicolon),
            _ => {}
        }
        i += 1;
    }
    if depth != 0 {
        return Err(ExpressionError::LeftOpen);
    }
    Ok(())
}

impl QualifiedName {
    pub fn parse(text: &str) -> Result<Self, NameError> {
        let mut parts = Vec::new();
        let mut current = String::new();
        let mut chars = text.chars().peekable();
        let mut quoted_part = false;
        while let Some(c) = chars.next() {
            match c {
                '"' if current.is_empty() && !quoted_part => {
                    quoted_part = true;
                    loop {
                        match chars.next() {
                            Some('"') if chars.peek() == Some(&'"') => {
                                chars.next();
                                current.push('"');
                            }
                            Some('"') => break,
                            Some(c) => current.push(c),
                            None => return Err(NameError::UnclosedQuote(text.to_owned())),
                        }
                    }
                }
                '.' if parts.is_empty() => {
                    parts.push(std::mem::take(&mut current));
                    quoted_part = false;
                }
                _ if quoted_part => return Err(NameError::AfterQuote(text.to_owned())),
                c => current.push(c),
            }
        }
        parts.push(current);
        if parts.iter().any(String::is_empty) {
            return Err(NameError::Empty(text.to_owned()));
        }
        let name = parts.pop().unwrap_or_default();
        Ok(QualifiedName {
            schema: parts.pop(),
            name,
        })
    }

    /// `"schema"."name"` or `"name"`.
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(s) => format!("{}.{}", quote(s), quote(&self.name)),
            None => quote(&self.name),
        }
    }
}

impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_must_keep_their_brackets() {
        for ok in [
            "kind <> 'audit'",
            "a = 1 AND (b = 2 OR c = 3)",
            "note = 'it''s ) here'",
            "note = E'\\' )'",
            "\"odd ) name\" = 1",
            "x = 1 -- a comment with ) and ;\n AND y = 2",
            "x = 1 /* ) /* nested ( */ */",
            "body = $q$ ) ; $q$",
            "x = $1",
        ] {
            assert!(
                check_expression(ok).is_ok(),
                "{ok}: {:?}",
                check_expression(ok)
            );
        }
        for bad in [
            "k = 'a') OR (k = 'b'",
            "x = 1)",
            "(x = 1",
            "x = 1; DELETE FROM t",
            "note = 'open",
            "\"open",
            "x = 1 /* open",
            "x = $q$ open",
            "x = 1 --\n) OR (true",
        ] {
            assert!(check_expression(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn plain_qualified_and_quoted_names() {
        let q = |s: &str| QualifiedName::parse(s).unwrap();
        assert_eq!(q("events").quoted(), "\"events\"");
        assert_eq!(q("audit.Events").quoted(), "\"audit\".\"Events\"");
        assert_eq!(q("\"my.table\"").quoted(), "\"my.table\"");
        assert_eq!(
            q("\"Sales Data\".\"Q\"\"1\"").quoted(),
            "\"Sales Data\".\"Q\"\"1\""
        );
        assert_eq!(q("x.y.z").name, "y.z", "only the first dot splits");
        assert_eq!(
            q("Weird \"Name\" Table").quoted(),
            "\"Weird \"\"Name\"\" Table\""
        );
    }

    #[test]
    fn injection_stays_inside_the_quotes() {
        let q = QualifiedName::parse("t; DROP TABLE users; --").unwrap();
        assert_eq!(q.quoted(), "\"t; DROP TABLE users; --\"");
        let q = QualifiedName::parse("\"a\"\"; DROP TABLE x; --\"").unwrap();
        assert_eq!(q.quoted(), "\"a\"\"; DROP TABLE x; --\"");
    }

    #[test]
    fn malformed_names_are_refused() {
        for bad in ["", ".", "a.", ".b", "\"open", "\"a\"b"] {
            assert!(QualifiedName::parse(bad).is_err(), "{bad:?}");
        }
    }
}
