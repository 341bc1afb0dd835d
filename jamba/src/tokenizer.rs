//! Text in and out: a Hugging Face `tokenizer.json` (Jamba's byte-fallback BPE) and a streaming
//! decoder that never emits half a UTF-8 character.

use std::path::Path;

use crate::error::{JambaError, Result};

/// A Hugging Face tokenizer.
///
/// ```no_run
/// let tok = jamba::tokenizer::JambaTokenizer::from_file("tokenizer.json")?;
/// let ids = tok.encode("Hello", true)?;
/// assert_eq!(tok.decode(&ids, true)?, "Hello");
/// # Ok::<(), jamba::JambaError>(())
/// ```
pub struct JambaTokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for JambaTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JambaTokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl JambaTokenizer {
    /// Reads a `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| JambaError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    /// Parses the contents of a `tokenizer.json`.
    pub fn from_bytes(json: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json)
            .map_err(|e| JambaError::Tokenizer(e.to_string()))?;
        Ok(Self { inner })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's template (e.g. a
    /// beginning-of-sequence token), as transformers does by default.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| JambaError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| JambaError::Tokenizer(e.to_string()))
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string, if it exists.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// Turns a stream of token ids into a stream of text pieces.
///
/// Byte-fallback tokenizers spell rare characters as several `<0xNN>` byte tokens; until the
/// last byte of a character arrives, decoding ends in U+FFFD. The stream holds such a tail back,
/// so concatenating its pieces gives exactly the decoded text, one whole character at a time.
///
/// ```no_run
/// # let tok = jamba::tokenizer::JambaTokenizer::from_file("tokenizer.json")?;
/// let mut stream = jamba::tokenizer::TextStream::new(&tok);
/// for id in tok.encode("naïve ✓", false)? {
///     if let Some(piece) = stream.push(id)? {
///         print!("{piece}");
///     }
/// }
/// # Ok::<(), jamba::JambaError>(())
/// ```
#[derive(Debug)]
pub struct TextStream<'a> {
    tokenizer: &'a JambaTokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'a> TextStream<'a> {
    /// An empty stream.
    pub fn new(tokenizer: &'a JambaTokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        // The whole sequence is decoded each time: decoders such as Jamba's strip the first
        // token's leading space, so decoding a suffix alone would drop spaces between pieces.
        let text = self.tokenizer.decode(&self.ids, true)?;
        // A trailing U+FFFD may be a character whose last bytes have not arrived yet: hold it.
        // One inside the text is a genuinely invalid byte and goes out with what follows it.
        let stable = text.trim_end_matches('\u{FFFD}');
        if stable.len() <= self.emitted || !stable.is_char_boundary(self.emitted) {
            return Ok(None);
        }
        let piece = stable[self.emitted..].to_string();
        self.emitted = stable.len();
        Ok(Some(piece))
    }

    /// Whatever is left at the end (an incomplete character is emitted as decoded).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let text = self.tokenizer.decode(&self.ids, true)?;
        if text.len() > self.emitted && text.is_char_boundary(self.emitted) {
            let piece = text[self.emitted..].to_string();
            self.emitted = text.len();
            return Ok(Some(piece));
        }
        Ok(None)
    }

    /// The ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}
