//! The CLIP BPE tokenizer, built from a diffusers-layout tokenizer/ folder (vocab.json,
//! merges.txt, special_tokens_map.json, tokenizer_config.json) the way transformers'
//! `CLIPTokenizer` builds it: NFC, whitespace runs collapsed, lowercase; CLIP's word regex
//! then byte-level; BPE with a `</w>` end-of-word suffix. Special tokens (bos, eos, unk and
//! the pad token, "!" for SD 2.x) are matched in the raw text before BPE, as transformers does.

use sdmesh_core::model_dir::{ComponentDir, ModelDirError};
use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

const CLIP_WORD_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Token ids of one prompt, padded or truncated to the context length.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// How many prompt tokens did not fit.
    pub truncated: usize,
}

pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    context_length: usize,
}

fn malformed(path: std::path::PathBuf, message: impl Into<String>) -> ModelDirError {
    ModelDirError::Malformed { path, message: message.into() }
}

/// A special token entry is either a string or an AddedToken object with "content".
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl ClipTokenizer {
    /// Loads tokenizer/ of a diffusers model folder. `max_positions` is the text encoder's
    /// position-embedding count; the context length is the smaller of it and the
    /// tokenizer's model_max_length.
    pub fn load(dir: &ComponentDir, max_positions: usize) -> Result<Self, ModelDirError> {
        let vocab = dir.file("vocab.json")?;
        let merges = dir.file("merges.txt")?;
        let config: Value = dir.json("tokenizer_config.json")?;
        // special_tokens_map.json overrides tokenizer_config.json, as in transformers.
        let special: Value = match dir.file("special_tokens_map.json") {
            Ok(p) => sdmesh_core::model_dir::read_json(&p)?,
            Err(_) => Value::Null,
        };
        let lookup = |name: &str, default: &str| -> String {
            special
                .get(name)
                .and_then(token_content)
                .or_else(|| config.get(name).and_then(token_content))
                .unwrap_or_else(|| default.to_string())
        };
        let bos_token = lookup("bos_token", "<|startoftext|>");
        let eos_token = lookup("eos_token", "<|endoftext|>");
        let unk_token = lookup("unk_token", "<|endoftext|>");
        let pad_token = lookup("pad_token", &eos_token);

        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .unk_token(unk_token.clone())
            .fuse_unk(false)
            .build()
            .map_err(|e| malformed(vocab.clone(), format!("vocab.json / merges.txt: {e}")))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let whitespace = Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(|e| malformed(dir.path.clone(), e.to_string()))?;
        tokenizer
            .with_normalizer(Some(NormSeq::new(vec![NFC.into(), whitespace.into(), Lowercase.into()])))
            .map_err(|e| malformed(dir.path.clone(), e.to_string()))?;
        let split = Split::new(SplitPattern::Regex(CLIP_WORD_PATTERN.into()), SplitDelimiterBehavior::Removed, true)
            .map_err(|e| malformed(dir.path.clone(), e.to_string()))?;
        tokenizer.with_pre_tokenizer(Some(PreSeq::new(vec![split.into(), ByteLevel::new(false, true, true).into()])));
        let specials: Vec<AddedToken> = [&bos_token, &eos_token, &unk_token, &pad_token]
            .iter()
            .map(|t| AddedToken::from(t.to_string(), true))
            .collect();
        tokenizer.add_special_tokens(specials).map_err(|e| malformed(dir.path.clone(), e.to_string()))?;

        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| malformed(vocab.clone(), format!("token {t:?} is not in the vocabulary")))
        };
        let model_max_length = config.get("model_max_length").and_then(Value::as_u64).unwrap_or(77) as usize;
        let context_length = model_max_length.min(max_positions);
        if context_length < 2 {
            return Err(malformed(dir.path.join("tokenizer_config.json"), "model_max_length must be at least 2"));
        }
        Ok(Self { bos: id(&bos_token)?, eos: id(&eos_token)?, pad: id(&pad_token)?, tokenizer, context_length })
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// `[bos] prompt tokens [eos] pad...`, exactly `context_length` ids; prompt tokens beyond
    /// `context_length - 2` are dropped (and counted).
    pub fn encode(&self, text: &str) -> Result<Tokens, String> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| format!("tokenizing failed: {e}"))?;
        let body = encoding.get_ids();
        let room = self.context_length - 2;
        let kept = body.len().min(room);
        let mut ids = Vec::with_capacity(self.context_length);
        ids.push(self.bos);
        ids.extend_from_slice(&body[..kept]);
        ids.push(self.eos);
        ids.resize(self.context_length, self.pad);
        Ok(Tokens { ids, truncated: body.len() - kept })
    }
}
