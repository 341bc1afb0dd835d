//! Configuration parsing, validation and the analytic figures.

mod common;

use jamba::config::{FeedForwardKind, MixerKind};
use jamba::{JambaConfig, JambaError};

fn published(name: &str) -> JambaConfig {
    JambaConfig::from_file(common::configs_dir().join(name)).unwrap()
}

#[test]
fn every_shared_config_and_fixture_config_parses() {
    let mut n = 0;
    for dir in [common::configs_dir()] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                JambaConfig::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
    }
    for dir in common::all_fixtures() {
        JambaConfig::from_file(dir.join("config.json")).unwrap();
        n += 1;
    }
    assert!(n >= 12, "only {n} configs found");
}

#[test]
fn layer_plans_match_the_fixtures() {
    for dir in common::all_fixtures() {
        let config = JambaConfig::from_file(dir.join("config.json")).unwrap();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("fixture.json")).unwrap())
                .unwrap();
        let kinds: Vec<&str> = meta["layers_block_type"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let experts: Vec<u64> = meta["layers_num_experts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        for (i, spec) in config.layer_plan().iter().enumerate() {
            let kind = if spec.mixer == MixerKind::Attention {
                "attention"
            } else {
                "mamba"
            };
            assert_eq!(kind, kinds[i], "{} layer {i}", dir.display());
            let n = match spec.feed_forward {
                FeedForwardKind::Mlp => 1,
                FeedForwardKind::Moe { num_experts, .. } => num_experts as u64,
            };
            // transformers writes num_experts for MoE layers and 1 for dense ones; with
            // num_experts = 1 both are a plain MLP.
            assert_eq!(n.max(1), experts[i].max(1), "{} layer {i}", dir.display());
        }
    }
}

fn billions(x: u64) -> f64 {
    (x as f64 / 1e8).round() / 10.0
}

#[test]
fn jamba_v01_parameter_counts() {
    let p = published("jamba-v0.1.config.json").param_count();
    assert_eq!(
        (billions(p.total), billions(p.active)),
        (51.6, 12.1),
        "{p:?}"
    );
    let mini = published("jamba-1.5-mini.config.json").param_count();
    assert_eq!(mini, p, "1.5-Mini has v0.1's shape");
}

#[test]
fn jamba_15_large_parameter_counts() {
    let p = published("jamba-1.5-large.config.json").param_count();
    assert_eq!(
        (billions(p.total), billions(p.active)),
        (398.6, 94.1),
        "{p:?}"
    );
}

#[test]
fn table1_kv_cache_at_256k_tokens() {
    let config = published("jamba-v0.1.config.json");
    let c = config.cache_size(1, 256 * 1024, 2);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "Jamba-v0.1 at 256K tokens, 16-bit: KV cache {:.2} GiB ({} attention layers), Mamba state {:.1} MiB \
         ({} layers: conv {:.1} MiB + SSM {:.1} MiB)",
        gib(c.kv_bytes),
        config.num_attention_layers(),
        c.mamba_bytes() as f64 / (1u64 << 20) as f64,
        config.num_mamba_layers(),
        c.conv_bytes as f64 / (1u64 << 20) as f64,
        c.ssm_bytes as f64 / (1u64 << 20) as f64,
    );
    // Paper, Table 1: 4 GB.
    assert!((gib(c.kv_bytes) - 4.0).abs() < 0.01);
    // The Mamba state does not grow with the context.
    assert_eq!(config.cache_size(1, 4096, 2).mamba_bytes(), c.mamba_bytes());
    // An all-attention model of the same shape would hold 8x the KV cache.
    let mut all_attention = config.clone();
    all_attention.attn_layer_period = 1;
    all_attention.attn_layer_offset = 0;
    assert_eq!(
        all_attention.cache_size(1, 256 * 1024, 2).kv_bytes,
        8 * c.kv_bytes
    );
}

#[test]
fn field_forms_and_defaults() {
    let c = JambaConfig::from_json_str(
        r#"{"hidden_size": 40, "num_attention_heads": 5, "num_local_experts": 3, "num_experts_per_tok": 3,
            "mamba_dt_rank": "auto", "eos_token_id": [2, 518], "some_future_field": {"x": 1}}"#,
    )
    .unwrap();
    assert_eq!(c.num_experts, 3);
    assert_eq!(c.dt_rank(), 3);
    assert_eq!(c.num_key_value_heads(), 5);
    assert_eq!(c.eos_token_ids(), vec![2, 518]);
    let c = JambaConfig::from_json_str(
        r#"{"mamba_dt_rank": 7, "eos_token_id": 9, "num_key_value_heads": 4}"#,
    )
    .unwrap();
    assert_eq!(
        (c.dt_rank(), c.eos_token_ids(), c.num_key_value_heads()),
        (7, vec![9], 4)
    );
    // Round trip through our own writer.
    let again = JambaConfig::from_json_str(&c.to_json_string()).unwrap();
    assert_eq!(again.param_count(), c.param_count());
}

#[test]
fn invalid_configurations_are_errors() {
    let cases = [
        (
            r#"{"attn_layer_period": 4, "attn_layer_offset": 4}"#,
            "attn_layer_offset",
        ),
        (
            r#"{"expert_layer_period": 2, "expert_layer_offset": 3}"#,
            "expert_layer_offset",
        ),
        (
            r#"{"hidden_size": 100, "num_attention_heads": 32}"#,
            "must divide hidden_size",
        ),
        (
            r#"{"num_attention_heads": 32, "num_key_value_heads": 5}"#,
            "must divide num_attention_heads",
        ),
        (
            r#"{"num_experts": 4, "num_experts_per_tok": 5}"#,
            "exceeds num_experts",
        ),
        (r#"{"hidden_size": 0}"#, "hidden_size must be positive"),
        (r#"{"vocab_size": 0}"#, "vocab_size must be positive"),
        (r#"{"mamba_d_state": 0}"#, "mamba_d_state must be positive"),
        (
            r#"{"num_hidden_layers": 0}"#,
            "num_hidden_layers must be positive",
        ),
        (
            r#"{"attn_layer_period": 0}"#,
            "attn_layer_period must be positive",
        ),
        (r#"{"hidden_act": "gelu"}"#, "hidden_act"),
        (r#"{"eos_token_id": []}"#, "eos_token_id"),
    ];
    for (json, expected) in cases {
        match JambaConfig::from_json_str(json) {
            Err(JambaError::Config(msg)) => assert!(msg.contains(expected), "{json}: {msg}"),
            other => panic!("{json}: expected a configuration error, got {other:?}"),
        }
    }
}

#[test]
fn malformed_json_names_the_file() {
    let dir = common::temp_dir("badjson");
    let path = dir.join("config.json");
    std::fs::write(&path, r#"{"hidden_size": 64,, }"#).unwrap();
    let err = JambaConfig::from_file(&path).unwrap_err();
    assert!(matches!(err, JambaError::Json { .. }), "{err:?}");
    assert!(err.to_string().contains("config.json"), "{err}");
    std::fs::write(&path, r#"{"hidden_size": "wide"}"#).unwrap();
    let err = JambaConfig::from_file(&path).unwrap_err();
    assert!(
        err.to_string().contains("config.json") && err.to_string().contains("hidden_size"),
        "{err}"
    );
}
