//! DeepSeek-R1 style reasoning: the text before `</think>` is `reasoning_content`, the text after it
//! is `content`. R1 templates end the prompt with `<think>\n`, so generation usually starts inside
//! the thinking block; models may also open it themselves. Works on streamed pieces: a tag split over
//! pieces is held back until it can be decided.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// Where generation starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningStart {
    /// The prompt already opened `<think>`.
    InThinking,
    /// Reasoning only if the output itself starts with `<think>`.
    Detect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting to see whether the output opens with `<think>` (after optional whitespace).
    Start,
    /// Inside thinking; `fresh` while nothing but whitespace has been seen (a repeated `<think>` is dropped).
    Thinking {
        fresh: bool,
    },
    Content,
}

/// Reasoning and content text split from one piece of output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

#[derive(Debug, Clone)]
pub struct ReasoningParser {
    state: State,
    held: String,
}

impl ReasoningParser {
    pub fn new(start: ReasoningStart) -> Self {
        let state = match start {
            ReasoningStart::InThinking => State::Thinking { fresh: true },
            ReasoningStart::Detect => State::Start,
        };
        ReasoningParser {
            state,
            held: String::new(),
        }
    }

    /// Whether a rendered prompt leaves the model inside a thinking block.
    pub fn start_for_prompt(prompt: &str) -> ReasoningStart {
        match (prompt.rfind(OPEN), prompt.rfind(CLOSE)) {
            (Some(open), Some(close)) if open > close => ReasoningStart::InThinking,
            (Some(_), None) => ReasoningStart::InThinking,
            _ => ReasoningStart::Detect,
        }
    }

    pub fn push(&mut self, text: &str) -> Split {
        self.held.push_str(text);
        let mut out = Split::default();
        loop {
            match self.state {
                State::Content => {
                    out.content.push_str(&std::mem::take(&mut self.held));
                    return out;
                }
                State::Start | State::Thinking { fresh: true } => {
                    let trimmed = self.held.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(OPEN) {
                        self.held = rest.to_owned();
                        self.state = State::Thinking { fresh: false };
                    } else if trimmed.is_empty() || OPEN.starts_with(trimmed) {
                        return out; // undecided
                    } else if self.state == State::Start {
                        self.state = State::Content;
                    } else {
                        self.state = State::Thinking { fresh: false };
                    }
                }
                State::Thinking { fresh: false } => {
                    if let Some(at) = self.held.find(CLOSE) {
                        out.reasoning.push_str(&self.held[..at]);
                        self.held.drain(..at + CLOSE.len());
                        self.state = State::Content;
                        continue;
                    }
                    let keep = partial_suffix(&self.held, CLOSE);
                    let cut = self.held.len() - keep;
                    out.reasoning.push_str(&self.held[..cut]);
                    self.held.drain(..cut);
                    return out;
                }
            }
        }
    }

    /// End of output: whatever is held goes where the state says (unterminated thinking stays reasoning).
    pub fn flush(&mut self) -> Split {
        let held = std::mem::take(&mut self.held);
        match self.state {
            State::Thinking { .. } => Split {
                reasoning: held,
                content: String::new(),
            },
            State::Start | State::Content => Split {
                reasoning: String::new(),
                content: held,
            },
        }
    }
}

fn partial_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && tag.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(start: ReasoningStart, pieces: &[&str]) -> (String, String) {
        let mut p = ReasoningParser::new(start);
        let (mut r, mut c) = (String::new(), String::new());
        for piece in pieces.iter().copied() {
            let s = p.push(piece);
            r += &s.reasoning;
            c += &s.content;
        }
        let s = p.flush();
        (r + &s.reasoning, c + &s.content)
    }

    #[test]
    fn prompt_opened_thinking_and_close_tag_split_over_pieces() {
        let (r, c) = run(
            ReasoningStart::InThinking,
            &["Let me", " think.</th", "ink>\n\nThe answer", " is 4."],
        );
        assert_eq!(r, "Let me think.");
        assert_eq!(c, "\n\nThe answer is 4.");
    }

    #[test]
    fn model_opens_thinking_itself() {
        let (r, c) = run(ReasoningStart::Detect, &["<th", "ink>\nhmm", "</think>ok"]);
        assert_eq!(r, "\nhmm");
        assert_eq!(c, "ok");
        // a repeated <think> after a prompt that opened one is dropped too
        let (r, c) = run(ReasoningStart::InThinking, &["\n<think>", "x</think>y"]);
        assert_eq!((r.as_str(), c.as_str()), ("x", "y"));
    }

    #[test]
    fn no_thinking_is_all_content_and_unterminated_thinking_is_all_reasoning() {
        assert_eq!(
            run(ReasoningStart::Detect, &["Hello", " <think> there"]),
            ("".into(), "Hello <think> there".into())
        );
        assert_eq!(
            run(ReasoningStart::InThinking, &["still ", "thinking</thi"]),
            ("still thinking</thi".into(), "".into())
        );
    }

    #[test]
    fn prompt_start_detection() {
        assert_eq!(
            ReasoningParser::start_for_prompt("<｜Assistant｜><think>\n"),
            ReasoningStart::InThinking
        );
        assert_eq!(
            ReasoningParser::start_for_prompt("<think>a</think>b<｜Assistant｜>"),
            ReasoningStart::Detect
        );
        assert_eq!(
            ReasoningParser::start_for_prompt("<|assistant|>"),
            ReasoningStart::Detect
        );
    }
}
