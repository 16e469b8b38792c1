//! From request text to tokens: the model's own chat template, then its tokenizer.
//!
//! These run on the blocking pool (`spawn_blocking`), never on a runtime thread: tokenizing a
//! long prompt is real CPU work.

use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::ChatTemplateError;

use crate::api::PlainMessage;
use crate::error::ApiError;

/// Renders `messages` with the chat template in the model's GGUF metadata, ending with the
/// opening of the assistant's turn. A model without a template gets ChatML, as llama.cpp does.
pub fn render_chat(model: &LlamaModel, messages: &[PlainMessage]) -> Result<String, ApiError> {
    let template = match model.chat_template(None) {
        Ok(t) => t,
        Err(ChatTemplateError::MissingTemplate) => LlamaChatTemplate::new("chatml")
            .map_err(|e| ApiError::Internal(format!("chatml template: {e}")))?,
        Err(e) => {
            return Err(ApiError::Internal(format!(
                "reading the model's chat template: {e}"
            )))
        }
    };
    let chat = messages
        .iter()
        .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::InvalidParam {
            param: "messages",
            message: format!("messages must not contain NUL characters ({e})"),
        })?;
    model
        .apply_chat_template(&template, &chat, true)
        .map_err(|e| {
            ApiError::Internal(format!(
                "the model's chat template is not one llama.cpp can apply: {e}"
            ))
        })
}

/// Tokenizes as llama.cpp's server does: the model's BOS/EOS conventions (`add_special`), and
/// special tokens written as text (`<|im_start|>`) read as the tokens they name.
pub fn tokenize(model: &LlamaModel, text: &str, add_special: bool) -> Vec<LlamaToken> {
    model.vocab().tokenize(text.as_bytes(), add_special, true)
}
