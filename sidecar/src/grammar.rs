//! Grammars for structured output: `response_format` becomes a GBNF grammar that the sampler
//! enforces token by token, so the text is valid by construction rather than by hope.

/// `{"type":"json_object"}`: one JSON object, then end of generation. This is llama.cpp's
/// `json.gbnf` with an object at the root; whitespace is bounded so a model cannot pad forever.
pub const JSON_OBJECT: &str = r#"root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws     ::= | " " | "\n" [ \t]{0,20}
"#;

/// `{"type":"json_schema"}`: llama.cpp's own schema-to-grammar converter.
pub fn from_json_schema(schema: &serde_json::Value) -> Result<String, String> {
    llama_cpp_2::json_schema_to_grammar(&schema.to_string()).map_err(|e| e.to_string())
}
