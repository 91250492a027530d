//! How the command line prints an error: its chain of causes on one line, each said once.
//!
//! The library's errors follow one convention: a variant that wraps another error says it in its
//! own message (`"{path}: {source}"`, so `to_string()` — what the Kotlin and Swift bindings show —
//! is complete) *and* returns it from `source()` (so programs can walk to the `io::Error`). A
//! plain chain print (`{:#}`) therefore repeats every wrapped message. This printer walks the same
//! chain but leaves out what was already said: a cause whose whole message is already on the line,
//! and a leading `"<path>: "` that the message before it ends with (`loading m.edm` then
//! `m.edm: No such file…`).

/// The line `edgediff` prints after `error: `.
pub fn error_line(e: &anyhow::Error) -> String {
    chain_line(e.chain().map(|c| c.to_string()))
}

/// Joins messages, outermost first, with ": ", each said once (see the module comment).
pub fn chain_line(messages: impl IntoIterator<Item = String>) -> String {
    let mut out = String::new();
    for msg in messages {
        let msg = msg.trim();
        if msg.is_empty() || out.contains(msg) {
            continue;
        }
        if let Some((head, rest)) = msg.split_once(": ") {
            if out == head || out.ends_with(&format!(" {head}")) {
                out.push_str(": ");
                out.push_str(rest);
                continue;
            }
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(msg);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_model_file_says_the_os_message_once_with_the_path() {
        let path = std::path::Path::new("/nonexistent-edgediff-test.edm");
        let e = crate::format::EdmFile::open(path).unwrap_err();
        let os = match &e {
            crate::format::FormatError::Io { source, .. } => source.to_string(),
            other => panic!("expected an I/O error, got {other}"),
        };
        let e = anyhow::Error::from(crate::engine::EngineError::from(e))
            .context(format!("loading {}", path.display()));
        // What `{:#}` printed before: the OS message twice.
        assert_eq!(format!("{e:#}").matches(&os).count(), 2, "{e:#}");
        let line = error_line(&e);
        assert_eq!(line, format!("loading {}: {os}", path.display()));
    }

    #[test]
    fn messages_are_joined_and_repeats_dropped() {
        let line = |m: &[&str]| chain_line(m.iter().map(|s| s.to_string()));
        assert_eq!(line(&["a", "b", "c"]), "a: b: c");
        assert_eq!(line(&["x.edm: gone", "gone"]), "x.edm: gone");
        assert_eq!(
            line(&["opening x.edm", "x.edm: gone", "gone"]),
            "opening x.edm: gone"
        );
        // A path that only starts like the previous one is a different path: kept.
        assert_eq!(
            line(&["converting /d", "/d/config.json: gone", "gone"]),
            "converting /d: /d/config.json: gone"
        );
        assert_eq!(line(&["only"]), "only");
        assert_eq!(line(&[]), "");
    }
}
