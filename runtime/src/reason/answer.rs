//! Answers out of a trace's text, and the vote over them.

use super::ReasonError;

/// Where a trace's answer is in its text.
#[derive(Clone, Debug, PartialEq)]
pub enum Extractor {
    /// The content of the last `\boxed{…}` (braces balanced), the convention of math benchmarks.
    Boxed,
    /// The last match of this regular expression: its first capture group when it has one, else
    /// the whole match.
    Regex(String),
}

impl Extractor {
    pub(crate) fn check(&self) -> Result<(), ReasonError> {
        match self {
            Extractor::Boxed => Ok(()),
            Extractor::Regex(p) => compile(p).map(|_| ()),
        }
    }

    /// The answer in `text`, normalised ([`normalise`]); `None` when there is none.
    pub fn extract(&self, text: &str) -> Result<Option<String>, ReasonError> {
        let raw = match self {
            Extractor::Boxed => last_boxed(text),
            Extractor::Regex(p) => {
                let re = compile(p)?;
                re.captures_iter(text).last().and_then(|c| {
                    c.get(1)
                        .or_else(|| c.get(0))
                        .map(|m| m.as_str().to_string())
                })
            }
        };
        Ok(raw.map(|a| normalise(&a)).filter(|a| !a.is_empty()))
    }
}

fn compile(pattern: &str) -> Result<regex::Regex, ReasonError> {
    regex::Regex::new(pattern).map_err(|e| ReasonError::BadPattern {
        pattern: pattern.to_string(),
        reason: e.to_string(),
    })
}

/// The content of the last `\boxed{…}`; an unclosed last one counts to the end of the text (a
/// trace cut by its budget).
fn last_boxed(text: &str) -> Option<String> {
    const OPEN: &str = "\\boxed{";
    let start = text.rfind(OPEN)? + OPEN.len();
    let mut depth = 1usize;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(text[start..start + i].to_string());
                }
            }
            _ => {}
        }
    }
    Some(text[start..].to_string())
}

/// Answers compare after trimming whitespace, surrounding `$` and a trailing full stop, so
/// "$42$", "42." and " 42" are one vote.
pub fn normalise(answer: &str) -> String {
    let mut a = answer;
    loop {
        let next = a.trim().trim_matches('$').trim_end_matches('.');
        if next == a {
            return a.to_string();
        }
        a = next;
    }
}

/// One answer and how many traces gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vote {
    pub answer: String,
    pub count: usize,
}

/// The answers' counts, most votes first; ties keep the order in which answers first appeared.
pub fn tally<'a>(answers: impl IntoIterator<Item = Option<&'a str>>) -> Vec<Vote> {
    let mut votes: Vec<Vote> = Vec::new();
    for a in answers.into_iter().flatten() {
        match votes.iter_mut().find(|v| v.answer == a) {
            Some(v) => v.count += 1,
            None => votes.push(Vote {
                answer: a.to_string(),
                count: 1,
            }),
        }
    }
    // Stable: equal counts stay in first-appearance order.
    votes.sort_by_key(|v| std::cmp::Reverse(v.count));
    votes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_boxed_answer_is_taken_with_nested_braces() {
        let e = Extractor::Boxed;
        let t = "first \\boxed{1} then \\boxed{\\frac{1}{2}} done";
        assert_eq!(e.extract(t).unwrap().as_deref(), Some("\\frac{1}{2}"));
        assert_eq!(e.extract("cut \\boxed{4").unwrap().as_deref(), Some("4"));
        assert_eq!(e.extract("no answer").unwrap(), None);
        assert_eq!(
            e.extract("\\boxed{ $42$. }").unwrap().as_deref(),
            Some("42")
        );
    }

    #[test]
    fn a_regex_takes_its_last_match_and_first_group() {
        let e = Extractor::Regex(r"answer is (-?\d+)".into());
        let t = "the answer is 3, no, the answer is -12.";
        assert_eq!(e.extract(t).unwrap().as_deref(), Some("-12"));
        let whole = Extractor::Regex(r"\d+".into());
        assert_eq!(whole.extract("1 2 33").unwrap().as_deref(), Some("33"));
        assert!(matches!(
            Extractor::Regex("(".into()).check(),
            Err(ReasonError::BadPattern { .. })
        ));
    }

    #[test]
    fn votes_count_and_break_ties_by_first_appearance() {
        let v = tally([Some("7"), None, Some("5"), Some("5"), Some("7"), Some("1")]);
        let got: Vec<(&str, usize)> = v.iter().map(|v| (v.answer.as_str(), v.count)).collect();
        assert_eq!(got, [("7", 2), ("5", 2), ("1", 1)]);
        assert!(tally([None, None]).is_empty());
    }
}
