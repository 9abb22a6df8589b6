//! Where things are in a config file, for the messages of errors found after parsing,
//! and a parse error shown at its line and column.

use super::*;

/// The same document, keeping only where things are (for error messages).
#[derive(serde::Deserialize)]
pub(super) struct Located {
    #[serde(default)]
    pub(super) services: Vec<LocatedService>,
    pub(super) snat: Here,
    pub(super) timeouts: Here,
    pub(super) maglev_table_size: Here,
    pub(super) decap: Here,
    pub(super) announce: Here,
    pub(super) flood_guard: Here,
}

type Here = Option<serde_saphyr::Spanned<serde::de::IgnoredAny>>;

#[derive(serde::Deserialize)]
pub(super) struct LocatedService {
    pub(super) name: Here,
    pub(super) vip: Here,
    pub(super) port: Here,
    pub(super) protocol: Here,
    pub(super) mode: Here,
    pub(super) session_affinity: Here,
    pub(super) health_check: Here,
    pub(super) encapsulated: Here,
    pub(super) allow: Here,
    pub(super) conntrack: Here,
    #[serde(default)]
    pub(super) backends: Vec<LocatedBackend>,
}

#[derive(serde::Deserialize)]
pub(super) struct LocatedBackend {
    pub(super) address: Here,
    pub(super) weight: Here,
    pub(super) via: Here,
}

impl Located {
    /// The path of the field whose value is at `at` ("services[0].backends[1].weight").
    pub(super) fn field_at(&self, at: &serde_saphyr::Location) -> Option<String> {
        let is_at = |h: &Here| {
            h.as_ref().is_some_and(|sp| {
                sp.referenced.line() == at.line() && sp.referenced.column() == at.column()
            })
        };
        let top = [
            ("snat", &self.snat),
            ("timeouts", &self.timeouts),
            ("maglev_table_size", &self.maglev_table_size),
            ("decap", &self.decap),
            ("announce", &self.announce),
            ("flood_guard", &self.flood_guard),
        ];
        if let Some((name, _)) = top.iter().find(|(_, h)| is_at(h)) {
            return Some((*name).to_owned());
        }
        for (i, s) in self.services.iter().enumerate() {
            let fields = [
                ("name", &s.name),
                ("vip", &s.vip),
                ("port", &s.port),
                ("protocol", &s.protocol),
                ("mode", &s.mode),
                ("session_affinity", &s.session_affinity),
                ("health_check", &s.health_check),
                ("encapsulated", &s.encapsulated),
                ("allow", &s.allow),
                ("conntrack", &s.conntrack),
            ];
            if let Some((name, _)) = fields.iter().find(|(_, h)| is_at(h)) {
                return Some(format!("services[{i}].{name}"));
            }
            for (j, b) in s.backends.iter().enumerate() {
                let fields = [
                    ("address", &b.address),
                    ("weight", &b.weight),
                    ("via", &b.via),
                ];
                if let Some((name, _)) = fields.iter().find(|(_, h)| is_at(h)) {
                    return Some(format!("services[{i}].backends[{j}].{name}"));
                }
            }
        }
        None
    }
}

/// A parse error as one location: "line L column C: FIELD: MESSAGE", then the line
/// with a caret under the value, headed "--> SOURCE:L:C" (the parser's own snippet
/// said `<input>`, and its header gave the column within its cropped window, not the
/// line's).
pub(super) fn describe_parse_error(
    e: &serde_saphyr::Error,
    text: &str,
    source: Option<&str>,
) -> String {
    use serde_saphyr::MessageFormatter;
    let mut inner = e;
    while let serde_saphyr::Error::AliasError { error, .. }
    | serde_saphyr::Error::WithSnippet { error, .. } = inner
    {
        inner = error;
    }
    let msg = clean(&serde_saphyr::DefaultMessageFormatter.format_message(inner));
    // The parser's advice to its own caller ("set DuplicateKeyPolicy in Options if
    // acceptable") is not the operator's to follow: the key is said twice, that is all.
    let msg = match msg.split_once(", set DuplicateKeyPolicy") {
        Some((head, _)) => format!("{head} (a key may be given once)"),
        None => msg,
    };
    let Some(at) = e.location().filter(|l| l.line() > 0 && l.column() > 0) else {
        return msg;
    };
    let (line, col) = (at.line(), at.column());
    // Which field, when the value it points at is one the located parse knows.
    let src_line = text.lines().nth(line as usize - 1);
    // A missing, unknown or repeated key is located at a key (for a missing one, the
    // last key read), which is no field at fault: only a value's error names its line's.
    let at_a_key = matches!(
        inner,
        serde_saphyr::Error::SerdeMissingField { .. }
            | serde_saphyr::Error::SerdeUnknownField { .. }
            | serde_saphyr::Error::DuplicateMappingKey { .. }
    );
    let field = serde_saphyr::from_str_with_options::<Located>(text, parse_options())
        .ok()
        .and_then(|l| l.field_at(&at))
        .or_else(|| {
            src_line
                .filter(|_| !at_a_key)
                .and_then(|l| key_of_line(l, col as usize))
        });
    let head = match field {
        // The message may already name the field ("port 70000 is out of range").
        Some(f) => format!("line {line} column {col}: {f}: {msg}"),
        None => format!("line {line} column {col}: {msg}"),
    };
    let Some(src_line) = src_line else {
        return head;
    };
    // A window of the line around the column, so a long (flow-style) line stays
    // readable; columns count characters, as the parser's do.
    let chars: Vec<char> = src_line.chars().collect();
    let c = (col as usize - 1).min(chars.len());
    let from = c.saturating_sub(60);
    let to = (c + 40).min(chars.len());
    let mut shown: String = clean(&chars[from..to].iter().collect::<String>());
    let mut caret_at = c - from;
    if from > 0 {
        shown.insert(0, '…');
        caret_at += 1;
    }
    if to < chars.len() {
        shown.push('…');
    }
    let width = (at.span().len() as usize).clamp(1, (to - c).max(1));
    let gutter = " ".repeat(line.to_string().len());
    let source = clean(source.unwrap_or("(config text)"));
    format!(
        "{head}\n{gutter}--> {source}:{line}:{col}\n{gutter} |\n{line} | {shown}\n{gutter} | {}{}",
        " ".repeat(caret_at),
        "^".repeat(width)
    )
}

/// The key of a block mapping's line (`  conntrack: null`, `- name: web`) when column
/// `col` (1-based) is at or after it: the field of a value the located parse does not
/// keep a place for (a null reads as an absent field there).
fn key_of_line(line: &str, col: usize) -> Option<String> {
    let body = line.trim_start();
    let body = body.strip_prefix("- ").map_or(body, str::trim_start);
    let start = line.len() - body.len();
    let (key, _) = body.split_once(':')?;
    let ok = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    (ok && col > start).then(|| key.to_owned())
}

/// Text from the file or the parser, safe for a terminal or a log: control characters
/// (other than tabs, shown as spaces to keep the caret aligned) are replaced.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\t' => ' ',
            c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') => '\u{fffd}',
            c => c,
        })
        .collect()
}
