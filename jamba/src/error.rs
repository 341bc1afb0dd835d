//! Errors of the `jamba` crate.
//!
//! Every fallible entry point returns [`JambaError`]. Loading errors name the file and, where one
//! is involved, the tensor, so that a broken checkpoint can be fixed without a debugger.

use std::path::PathBuf;

/// Everything that can go wrong while configuring, loading or running a Jamba model.
#[derive(Debug, thiserror::Error)]
pub enum JambaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (config, shard index) is malformed or has a field of the wrong type.
    #[error("{path}: malformed JSON: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error, with the field, line and column.
        message: String,
    },
    /// The configuration is well-formed JSON but describes an impossible model.
    #[error("invalid Jamba configuration: {0}")]
    Config(String),
    /// A safetensors file is truncated or its header is malformed.
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// The model needs a tensor that the checkpoint does not have.
    #[error("{path}: missing tensor `{name}` (expected shape {expected:?})")]
    MissingTensor {
        /// The checkpoint file or folder searched.
        path: PathBuf,
        /// The tensor's key.
        name: String,
        /// The shape the model expects.
        expected: Vec<usize>,
    },
    /// The checkpoint has a tensor that no parameter of the model takes.
    #[error(
        "{path}: unexpected tensor `{name}` (shape {shape:?}): no parameter of this configuration takes it"
    )]
    UnexpectedTensor {
        /// The file holding it.
        path: PathBuf,
        /// The tensor's key.
        name: String,
        /// Its shape on disk.
        shape: Vec<usize>,
    },
    /// A tensor's shape on disk differs from what the configuration implies.
    #[error(
        "{path}: tensor `{name}` has shape {found:?} but the configuration expects {expected:?}"
    )]
    ShapeMismatch {
        /// The file holding it.
        path: PathBuf,
        /// The tensor's key.
        name: String,
        /// The shape the model expects.
        expected: Vec<usize>,
        /// The shape on disk.
        found: Vec<usize>,
    },
    /// A tensor is stored in a dtype this crate cannot convert.
    #[error(
        "{path}: tensor `{name}` has unsupported dtype {dtype} (supported: F32, BF16, F16, F64)"
    )]
    UnsupportedDtype {
        /// The file holding it.
        path: PathBuf,
        /// The tensor's key.
        name: String,
        /// The dtype as safetensors names it.
        dtype: String,
    },
    /// A folder holds no weights in a layout this crate knows.
    #[error("{path}: no model.safetensors or model.safetensors.index.json")]
    NoWeights {
        /// The folder.
        path: PathBuf,
    },
    /// Invalid input to a forward pass or to generation.
    #[error("invalid input: {0}")]
    Input(String),
    /// A tokenizer could not be loaded or failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl JambaError {
    /// Parses `text` (read from `path`) as JSON into `T`, naming the offending field on error.
    pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
        path: impl Into<PathBuf>,
        text: &str,
    ) -> Result<T> {
        let de = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let message = if field.is_empty() || field == "." {
                inner.to_string()
            } else {
                format!("field `{field}`: {inner}")
            };
            JambaError::Json {
                path: path.into(),
                message,
            }
        })
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = JambaError> = std::result::Result<T, E>;
