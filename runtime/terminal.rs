//! Untrusted text on a terminal. Labels inside a model file, profile names, file names and
//! device names come from whoever made them: a newline in a label would forge a result line,
//! an escape sequence would recolour or retitle the terminal, a bidi override would reorder
//! what is shown. Human-readable output shows such characters escaped (`\n`, `\u{1b}`,
//! `\u{202e}`); JSON output escapes them by its own rules.

use std::borrow::Cow;
use std::fmt;

/// Whether `c` must not reach a terminal as it is: control characters (C0, DEL, C1) and the
/// invisible characters that change the direction or joining of the text around them.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{2069}'
                | '\u{FEFF}'
        )
}

/// `s` with every control, bidi and invisible formatting character escaped; borrowed when
/// there is none (the common case).
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_unsafe(c) {
            // `\n`, `\t`, `\r` stay readable; the rest become `\u{...}`.
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Shows a value's text escaped for a terminal: `Escaped(label)`, `Escaped(path.display())`.
pub struct Escaped<T>(pub T);

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.to_string();
        // Padding and alignment (`{:<14}`) apply to the escaped text.
        f.pad(&escape(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_bidi_characters_are_escaped_and_the_rest_kept() {
        assert!(matches!(escape("Ankle boot Été 靴"), Cow::Borrowed(_)));
        assert_eq!(escape("a\nb"), "a\\nb");
        assert_eq!(escape("\u{1b}]0;pwned\u{7}"), "\\u{1b}]0;pwned\\u{7}");
        assert_eq!(escape("x\u{202e}gpj.exe"), "x\\u{202e}gpj.exe");
        assert_eq!(escape("nul\0"), "nul\\u{0}");
        assert_eq!(escape("c1\u{9b}31m"), "c1\\u{9b}31m");
        assert_eq!(format!("[{:<6}]", Escaped("a\tb")), "[a\\tb  ]");
    }
}
