//! The tokenizer, the streaming decoder, sampling, and generation's input errors.

mod common;

use jamba::engine::ops::DeviceOps;
use jamba::generation::{GenerationConfig, SamplingConfig, SplitMix64, generate, sample};
use jamba::tokenizer::{JambaTokenizer, TextStream};
use jamba::{Engine, EngineOptions, ForwardOptions, GreedyPipeline, Jamba, JambaError, LoadOptions};

type B = jamba::backends::Cpu;

fn tokenizer() -> JambaTokenizer {
    JambaTokenizer::from_file(common::fixture("tiny-jamba").join("tokenizer.json")).unwrap()
}

#[test]
fn tokenizer_cases_round_trip() {
    let tok = tokenizer();
    let text = std::fs::read_to_string(common::fixture("tiny-jamba").join("tokenizer_cases.json"))
        .unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text, true).unwrap(), ids, "encoding {text:?}");
        let decoded = case["decoded"].as_str().unwrap_or(text);
        assert_eq!(
            tok.decode(&ids, true).unwrap(),
            decoded,
            "decoding {text:?}"
        );
    }
}

#[test]
fn streaming_never_splits_a_character() {
    let tok = tokenizer();
    for text in [
        "naïve café – ünïcödé ✓ 😀",
        "Beautiful is better than ugly. 😀😀 ✓✓",
        "  two  spaces\tand\nnewline",
    ] {
        let ids = tok.encode(text, true).unwrap();
        assert!(ids.len() > 5);
        let mut stream = TextStream::new(&tok);
        let mut pieces = Vec::new();
        for id in ids.iter().copied() {
            if let Some(p) = stream.push(id).unwrap() {
                pieces.push(p);
            }
        }
        pieces.extend(stream.finish().unwrap());
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert_eq!(pieces.concat(), tok.decode(&ids, true).unwrap());
        // The multi-byte characters are spelled with byte-fallback tokens, so some tokens emit nothing.
        if !text.is_ascii() {
            assert!(
                pieces.len() < ids.len(),
                "{text}: {} pieces for {} tokens",
                pieces.len(),
                ids.len()
            );
        }
    }
}

fn model() -> Jamba<B> {
    Jamba::<B>::from_pretrained(
        common::fixture("tiny-jamba"),
        &Default::default(),
        &LoadOptions::default(),
    )
    .unwrap()
}

fn engine() -> Engine<B> {
    Engine::new(model(), EngineOptions::default())
}

#[test]
fn sampling_is_reproducible_and_respects_top_k() {
    let model = engine();
    let prompts = vec![vec![300, 70, 281], vec![299, 73]];
    let config = |seed| GenerationConfig {
        max_new_tokens: 10,
        sampling: SamplingConfig {
            temperature: 1.5,
            top_k: Some(5),
            top_p: Some(0.95),
            seed,
        },
        ..Default::default()
    };
    let a = generate(&model, &prompts, &config(7), |_, _| {}).unwrap();
    let b = generate(&model, &prompts, &config(7), |_, _| {}).unwrap();
    let c = generate(&model, &prompts, &config(8), |_, _| {}).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, c.tokens, "another seed gives another sample");

    // top-k = 3 draws only among the three largest logits.
    let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 50) as f32 / 10.0).collect();
    let mut order: Vec<usize> = (0..50).collect();
    order.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]));
    let mut rng = SplitMix64::new(11);
    let cfg = SamplingConfig {
        temperature: 5.0,
        top_k: Some(3),
        top_p: None,
        seed: 0,
    };
    for _ in 0..200 {
        let t = sample(&logits, &cfg, &mut rng) as usize;
        assert!(order[..3].contains(&t));
    }
    // top-p small enough keeps only the argmax.
    let cfg = SamplingConfig {
        temperature: 1.0,
        top_k: None,
        top_p: Some(1e-6),
        seed: 0,
    };
    assert_eq!(sample(&logits, &cfg, &mut rng) as usize, order[0]);
}

#[test]
fn stops_on_any_eos_id_and_streams_every_token() {
    let model = engine();
    let greedy = GenerationConfig {
        max_new_tokens: 12,
        ..Default::default()
    };
    let prompt = vec![vec![300, 70, 281, 277]];
    let free = generate(&model, &prompt, &greedy, |_, _| {}).unwrap();
    let third = free.tokens[0][2];
    let with_eos = GenerationConfig {
        eos_token_ids: vec![9999, third],
        ..greedy
    };
    let mut streamed = Vec::new();
    let out = generate(&model, &prompt, &with_eos, |row, t| streamed.push((row, t))).unwrap();
    let first = free.tokens[0].iter().position(|&t| t == third).unwrap();
    assert_eq!(out.tokens[0], free.tokens[0][..=first].to_vec());
    assert_eq!(out.finish[0], jamba::generation::FinishReason::Eos);
    assert_eq!(
        streamed.iter().map(|&(_, t)| t).collect::<Vec<_>>(),
        out.tokens[0]
    );
}

/// The engine's greedy generation, pipelined (each step queued before the previous step's
/// tokens are read, the default) and not, against the definition: each prompt alone, every
/// token from the model's plain forward over the prompt and the tokens so far, no cache. A
/// batch of three prompts of different lengths, free and then with end-of-sequence ids that
/// stop the rows at different steps (the stopped rows' extra steps must not leak into the
/// others).
#[test]
fn greedy_generation_matches_step_by_step_decoding() {
    let engine = engine();
    let unpipelined = Engine::new(
        model(),
        EngineOptions {
            greedy_pipeline: false,
            ..Default::default()
        },
    );
    let model = engine.model();
    let prompts = vec![vec![300, 70, 281], vec![299, 73], vec![5, 6, 7, 8, 9]];
    let alone = |prompt: &[u32], eos: &[u32], max_new: usize| -> Vec<u32> {
        let mut ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
        let mut out = Vec::new();
        while out.len() < max_new {
            let n = ids.len();
            let t = burn::tensor::Tensor::<B, 2, burn::tensor::Int>::from_data(
                burn::tensor::TensorData::new(ids.clone(), [1, n]),
                &Default::default(),
            );
            let logits = model
                .forward(t, None, None, &ForwardOptions::default())
                .unwrap()
                .logits;
            let [_, seq, vocab] = logits.dims();
            let last = jamba::reference::to_vec(logits.slice([0..1, seq - 1..seq, 0..vocab]));
            let t = jamba::generation::argmax(&last);
            out.push(t);
            ids.push(t as i64);
            if eos.contains(&t) {
                break;
            }
        }
        out
    };
    let free_config = GenerationConfig {
        max_new_tokens: 9,
        ..Default::default()
    };
    let free = generate(&engine, &prompts, &free_config, |_, _| {}).unwrap();
    let free_unpipelined = generate(&unpipelined, &prompts, &free_config, |_, _| {}).unwrap();
    for (r, p) in prompts.iter().enumerate() {
        let expected = alone(p, &[], 9);
        assert_eq!(free.tokens[r], expected, "row {r}, no end-of-sequence id");
        assert_eq!(free_unpipelined.tokens[r], expected, "row {r}, not pipelined");
    }
    // Row 0 stops at its third token, row 1 at its fifth (unless an earlier token matches).
    let eos = vec![free.tokens[0][2], free.tokens[1][4]];
    let stopping = GenerationConfig {
        eos_token_ids: eos.clone(),
        ..free_config
    };
    let out = generate(&engine, &prompts, &stopping, |_, _| {}).unwrap();
    let out_unpipelined = generate(&unpipelined, &prompts, &stopping, |_, _| {}).unwrap();
    for (r, p) in prompts.iter().enumerate() {
        let expected = alone(p, &eos, 9);
        assert_eq!(out.tokens[r], expected, "row {r}, stopping on {eos:?}");
        assert_eq!(out_unpipelined.tokens[r], expected, "row {r}, not pipelined");
    }
    assert_eq!(out.finish[0], jamba::generation::FinishReason::Eos);
}

#[test]
fn bad_inputs_are_errors() {
    let engine = engine();
    let model = engine.model();
    let no_position = burn::tensor::Tensor::<B, 3>::zeros([1, 0, 512], &Default::default());
    let err = GreedyPipeline::new(&engine, no_position)
        .err()
        .expect("logits without a position are an error");
    assert!(err.to_string().contains("[1, 0, 512]"), "{err}");
    let mut cache = model.new_cache(2);
    let one_row = burn::tensor::Tensor::<B, 3>::zeros([1, 1, 512], &Default::default());
    let mut pipe = GreedyPipeline::new(&engine, one_row).unwrap();
    assert!(
        pipe.queue_step(&mut cache).is_err(),
        "a cache of another batch size"
    );
    pipe.next_tokens().unwrap();
    assert!(pipe.next_tokens().is_err(), "nothing queued");
    let config = GenerationConfig {
        max_new_tokens: 3,
        max_context: Some(8),
        ..Default::default()
    };
    let cases: [(Vec<Vec<u32>>, &str); 4] = [
        (vec![], "no prompt"),
        (vec![vec![5], vec![]], "prompt 1 is empty"),
        (vec![vec![5, 512]], "outside the vocabulary"),
        (vec![(0..9).collect()], "maximum context"),
    ];
    for (prompts, expected) in cases {
        match generate(&engine, &prompts, &config, |_, _| {}) {
            Err(JambaError::Input(msg)) => assert!(msg.contains(expected), "{msg}"),
            other => panic!("{expected}: got {other:?}"),
        }
    }
    // The context limit also stops generation.
    let out = generate(
        &engine,
        &[vec![5, 6, 7, 8, 9, 10]],
        &GenerationConfig {
            max_new_tokens: 10,
            ..config
        },
        |_, _| {},
    )
    .unwrap();
    assert_eq!(out.tokens[0].len(), 2);
    // And the engine and the model's forward refuse bad ids and masks.
    let mut cache = engine.new_cache(1);
    for (ids, mask, expected) in [
        (vec![1, 600], None, "outside the vocabulary"),
        (vec![1, -1], None, "outside the vocabulary"),
        (vec![1, 2], Some(vec![1, 1, 1]), "attention mask"),
        (vec![], None, "non-empty rows"),
    ] {
        match engine.forward(&ids, 1, mask.as_deref(), &mut cache, None) {
            Err(JambaError::Input(msg)) => assert!(msg.contains(expected), "{msg}"),
            other => panic!("{expected}: got {other:?}"),
        }
    }
    use burn::tensor::{Int, Tensor};
    let dev = Default::default();
    let bad = Tensor::<B, 2, Int>::from_ints([[1, 600]], &dev);
    assert!(model.forward(bad, None, None, &Default::default()).is_err());
    let ids = Tensor::<B, 2, Int>::from_ints([[1, 2]], &dev);
    let mask = Tensor::<B, 2, Int>::from_ints([[1, 1, 1]], &dev);
    assert!(
        model
            .forward(ids, Some(mask), None, &Default::default())
            .is_err()
    );
}

#[test]
fn cache_reports_size_resets_and_selects_rows() {
    let model = model();
    let dev = Default::default();
    use burn::tensor::{Int, Tensor};
    let mut cache = model.new_cache(2);
    let ids = Tensor::<B, 2, Int>::from_ints([[300, 70, 281], [299, 73, 293]], &dev);
    let both = model
        .forward(ids.clone(), None, Some(&mut cache), &Default::default())
        .unwrap();
    assert_eq!(cache.seq_len(), 3);
    let config = model.config().clone();
    // Two attention layers' keys and values (one 256-position block each), six Mamba states.
    let kv = 2 * 2 * (2 * 2 * 256 * 16) * 4;
    let mamba = 6 * (2 * 3 * 128 * 4 + 2 * 128 * 8 * 4);
    assert_eq!(cache.size_bytes(), (kv + mamba) as u64, "{config:?}");
    // Row 1 alone continues exactly as in the batch.
    let mut single = cache.clone();
    single.select_rows(&[1]);
    let next = Tensor::<B, 2, Int>::from_ints([[5], [6]], &dev);
    let batch_next = model
        .forward(next, None, Some(&mut cache), &Default::default())
        .unwrap();
    let one_next = model
        .forward(
            Tensor::<B, 2, Int>::from_ints([[6]], &dev),
            None,
            Some(&mut single),
            &Default::default(),
        )
        .unwrap();
    let a = jamba::reference::to_vec(batch_next.logits.slice([1..2]));
    let b = jamba::reference::to_vec(one_next.logits);
    assert!(jamba::reference::rel_err(&b, &a) < 1e-6);
    cache.reset();
    assert_eq!(cache.seq_len(), 0);
    let again = model
        .forward(ids, None, Some(&mut cache), &Default::default())
        .unwrap();
    assert_eq!(
        jamba::reference::to_vec(again.logits),
        jamba::reference::to_vec(both.logits)
    );
    // A cache of the wrong batch size is an error, not a panic.
    let one = Tensor::<B, 2, Int>::from_ints([[5]], &dev);
    assert!(
        model
            .forward(one, None, Some(&mut cache), &Default::default())
            .is_err()
    );
}

/// The device argmax (two stages for large vocabularies) agrees with the host loop, the first
/// index on ties, on random logits and on rows with the maximum repeated across blocks.
#[test]
fn device_argmax_matches_the_host_loop() {
    let device = Default::default();
    let mut rng = SplitMix64::new(12);
    for &(batch, seq, vocab) in &[
        (2usize, 3usize, 65_536usize),
        (3, 1, 4096),
        (1, 2, 5003),
        (2, 1, 100),
    ] {
        let mut values: Vec<f32> = (0..batch * seq * vocab)
            .map(|_| (rng.next_f64() * 8.0 - 4.0) as f32)
            .collect();
        // Ties: the row maximum repeated later in the same row (another block, and the same one).
        for row in values.chunks_exact_mut(vocab) {
            let best = jamba::generation::argmax(row) as usize;
            let v = row[best];
            row[(best + vocab / 2) % vocab] = v;
            row[(best + 1) % vocab] = v;
        }
        let expected: Vec<i64> = values
            .chunks_exact(vocab)
            .map(|row| jamba::generation::argmax(row) as i64)
            .collect();
        let logits = burn::tensor::Tensor::<B, 3>::from_data(
            burn::tensor::TensorData::new(values, [batch, seq, vocab]),
            &device,
        );
        let got = B::argmax_rows(logits.reshape([batch * seq, vocab]))
            .into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .unwrap();
        assert_eq!(got, expected, "batch {batch} seq {seq} vocab {vocab}");
    }
}
