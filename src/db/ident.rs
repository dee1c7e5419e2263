//! Table, column and view names from the config: parsed once, always quoted.
//!
//! A name is used exactly as written (case-sensitive) and always sent to the database
//! as a quoted identifier, so quotes, semicolons, spaces or comment markers in it can
//! never become SQL. `schema.table` splits at the first dot outside double quotes;
//! inside double quotes `""` stands for one `"`.

use std::fmt;

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

impl QualifiedName {
    pub fn parse(text: &str) -> Result<Self, String> {
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
                            None => return Err(format!("\"{text}\" has an unclosed double quote")),
                        }
                    }
                }
                '.' if parts.is_empty() => {
                    parts.push(std::mem::take(&mut current));
                    quoted_part = false;
                }
                _ if quoted_part => {
                    return Err(format!(
                        "\"{text}\": text after a closing double quote; quote the whole name"
                    ))
                }
                c => current.push(c),
            }
        }
        parts.push(current);
        if parts.iter().any(String::is_empty) {
            return Err(format!(
                "\"{text}\" is not a valid name; write table or schema.table"
            ));
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
