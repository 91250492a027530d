//! Options checked against the model before any work: a flag that cannot fit the model's context
//! is refused with the limit and the flag to change, before a GPU is started, a model is loaded or
//! a bandwidth is measured.

/// A command-line option the model cannot satisfy. `limit` is the model's context
/// (`max_position` in its file: positions of prompt and generated text together).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error(
        "--context {context} plus a block of {tokens} tokens (the largest of --tokens) needs {} \
         positions, but the model's context is {limit}: lower --context to at most {}",
        context + tokens,
        limit.saturating_sub(*tokens)
    )]
    BenchContext {
        context: usize,
        tokens: usize,
        limit: usize,
    },
    #[error(
        "--tokens {tokens} is larger than the model's context of {limit} positions: \
         keep every --tokens value at most {limit}"
    )]
    BenchTokens { tokens: usize, limit: usize },
    #[error("--tokens 0: every block needs at least 1 token")]
    ZeroTokens,
    #[error(
        "--max-tokens {max_tokens} leaves no room for a prompt in the model's context of {limit} \
         positions: lower --max-tokens to at most {}",
        limit.saturating_sub(1)
    )]
    MaxTokens { max_tokens: usize, limit: usize },
    #[error(
        "--block-size {block_size} is larger than the model's context of {limit} positions: \
         lower --block-size to at most {limit}"
    )]
    BlockSize { block_size: usize, limit: usize },
    #[error(
        "{what} is {prompt} tokens; with --max-tokens {max_tokens} that is {} positions, past the \
         model's context of {limit}: lower --max-tokens to at most {} or shorten the prompt",
        prompt + max_tokens,
        limit.saturating_sub(*prompt)
    )]
    PromptTooLong {
        what: String,
        prompt: usize,
        max_tokens: usize,
        limit: usize,
    },
}

/// `bench kernels` / `bench forward` on a model of context `limit`: `--context` cached positions, then blocks of each of
/// `--tokens`.
pub fn check_bench(limit: usize, context: usize, tokens: &[usize]) -> Result<(), OptionError> {
    if tokens.contains(&0) {
        return Err(OptionError::ZeroTokens);
    }
    let largest = tokens.iter().copied().max().unwrap_or(1);
    if largest > limit {
        return Err(OptionError::BenchTokens {
            tokens: largest,
            limit,
        });
    }
    if context.saturating_add(largest) > limit {
        return Err(OptionError::BenchContext {
            context,
            tokens: largest,
            limit,
        });
    }
    Ok(())
}

/// The decoding flags of `generate`, `chat` and `bench decode|experts`, before the prompt is
/// known: at least one prompt position must remain, and a block (or draft) must fit the context.
pub fn check_decoding(
    limit: usize,
    max_tokens: usize,
    block_size: Option<usize>,
) -> Result<(), OptionError> {
    if max_tokens >= limit {
        return Err(OptionError::MaxTokens { max_tokens, limit });
    }
    if let Some(b) = block_size.filter(|&b| b > limit) {
        return Err(OptionError::BlockSize {
            block_size: b,
            limit,
        });
    }
    Ok(())
}

/// A prompt of `prompt` tokens and `--max-tokens` together must fit the context.
pub fn check_prompt(
    limit: usize,
    what: impl Into<String>,
    prompt: usize,
    max_tokens: usize,
) -> Result<(), OptionError> {
    if prompt.saturating_add(max_tokens) > limit {
        return Err(OptionError::PromptTooLong {
            what: what.into(),
            prompt,
            max_tokens,
            limit,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_context_past_the_model_names_the_limit_and_the_flag() {
        let c = 512;
        let e = check_bench(c, 1024, &[1, 4, 64]).unwrap_err();
        assert_eq!(
            e,
            OptionError::BenchContext {
                context: 1024,
                tokens: 64,
                limit: 512
            }
        );
        let text = e.to_string();
        assert!(text.contains("512") && text.contains("--context"), "{text}");
        assert!(text.contains("at most 448"), "{text}");
        // The largest block decides; the defaults of a small model fit.
        assert!(check_bench(c, 448, &[1, 64]).is_ok());
        assert!(check_bench(c, 449, &[1, 64]).is_err());
        assert_eq!(
            check_bench(c, 0, &[1024]),
            Err(OptionError::BenchTokens {
                tokens: 1024,
                limit: 512
            })
        );
        assert_eq!(check_bench(c, 0, &[0, 4]), Err(OptionError::ZeroTokens));
    }

    #[test]
    fn decoding_flags_past_the_context_are_refused() {
        let c = 512;
        assert!(check_decoding(c, 511, Some(512)).is_ok());
        assert!(check_decoding(c, 128, None).is_ok());
        let e = check_decoding(c, 512, None).unwrap_err();
        assert_eq!(
            e,
            OptionError::MaxTokens {
                max_tokens: 512,
                limit: 512
            }
        );
        assert!(e.to_string().contains("--max-tokens to at most 511"), "{e}");
        let e = check_decoding(c, 16, Some(1024)).unwrap_err();
        assert!(e.to_string().contains("--block-size"), "{e}");
        let e = check_prompt(c, "prompt 2", 500, 128).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("prompt 2 is 500 tokens") && text.contains("at most 12"),
            "{text}"
        );
        assert!(check_prompt(c, "the prompt", 384, 128).is_ok());
    }
}
