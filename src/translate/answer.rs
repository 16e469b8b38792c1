//! The pipeline's one handle on a translated answer, whichever API the client speaks: a whole
//! chat answer made the client's (`from_chat`), an error in its shape, and the translator of a
//! chat stream into its events.

use serde_json::Value;

use super::{messages, responses, Event};

/// What a translated answer says of itself, in the client's API: a chat answer becomes its
/// `response` or `message`, a chat stream its events.
#[derive(Debug, Clone)]
pub enum Answer {
    Responses(responses::Meta),
    Messages(messages::Meta),
}

impl Answer {
    /// A whole chat completion in the client's API, as JSON (a `response` is written without
    /// building its tree).
    pub fn from_chat_json(&self, chat: &Value) -> Vec<u8> {
        match self {
            Answer::Responses(meta) => responses::from_chat_json(chat, meta),
            Answer::Messages(meta) => {
                serde_json::to_vec(&messages::from_chat(chat, meta)).unwrap_or_default()
            }
        }
    }

    /// An error answer (`status`, an OpenAI-shaped `body`) in the client's API; `None` when
    /// it is the same (Responses errors are OpenAI's).
    pub fn error(&self, status: u16, body: &[u8]) -> Option<Value> {
        match self {
            Answer::Responses(_) => None,
            Answer::Messages(_) => Some(messages::error_from_openai(status, body)),
        }
    }

    /// The translator of a chat stream into the client's events.
    pub fn stream(&self) -> Stream {
        match self {
            Answer::Responses(meta) => {
                Stream::Responses(responses::StreamTranslator::new(meta.clone()))
            }
            Answer::Messages(meta) => {
                Stream::Messages(messages::StreamTranslator::new(meta.clone()))
            }
        }
    }
}

/// Chat completion chunks in, the client's stream events out.
#[derive(Debug)]
pub enum Stream {
    Responses(responses::StreamTranslator),
    Messages(messages::StreamTranslator),
}

impl Stream {
    /// The stream's opening events (`response.created`…, `message_start`…), once.
    pub fn start(&mut self, out: &mut Vec<Event>) {
        match self {
            Stream::Responses(t) => t.start(out),
            Stream::Messages(t) => t.start(out),
        }
    }

    /// The events one chat chunk makes.
    pub fn chunk(&mut self, chunk: &Value, out: &mut Vec<Event>) {
        match self {
            Stream::Responses(t) => t.chunk(chunk, out),
            Stream::Messages(t) => t.chunk(chunk, out),
        }
    }

    /// The stream's end (`[DONE]`).
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        match self {
            Stream::Responses(t) => t.finish(out),
            Stream::Messages(t) => t.finish(out),
        }
    }

    /// The stream failed after its first event: its closing failure event, once.
    pub fn fail(&mut self, message: &str, out: &mut Vec<Event>) {
        match self {
            Stream::Responses(t) => t.fail(message, out),
            Stream::Messages(t) => t.fail(message, out),
        }
    }

    /// The finished `response` of a Responses stream that completed, once.
    pub fn take_completed(&mut self) -> Option<Value> {
        match self {
            Stream::Responses(t) => t.take_completed(),
            Stream::Messages(_) => None,
        }
    }

    /// Whether the stream has ended.
    pub fn finished(&self) -> bool {
        match self {
            Stream::Responses(t) => t.finished(),
            Stream::Messages(t) => t.finished(),
        }
    }
}
