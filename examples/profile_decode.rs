//! Where a CPU decode step's time goes: the whole model, one layer of each kind, the head.
//! `cargo run --release --example profile_decode -- ../shared/configs/bench-jamba-cpu.config.json`
//! A second argument `N > 1` times a prefill of N tokens instead (layers without a cache).
use std::time::Instant;

use burn::tensor::{Distribution, Int, Tensor};
use jamba::backends::Cpu as B;
use jamba::config::MixerKind;
use jamba::layer::LayerMasks;
use jamba::{ForwardOptions, Jamba, JambaConfig};

fn main() -> jamba::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or("../shared/configs/bench-jamba-cpu.config.json".into());
    let tokens: usize = std::env::args()
        .nth(2)
        .map_or(1, |n| n.parse().expect("N: a token count"));
    let config = JambaConfig::from_file(path)?;
    let dev = Default::default();
    let model = Jamba::<B>::init(&config, &dev);
    let keep = ForwardOptions {
        logits_to_keep: Some(1),
        ..Default::default()
    };
    let mut cache = model.new_cache(1);
    let prompt = Tensor::<B, 2>::random([1, 64], Distribution::Uniform(3.0, 1000.0), &dev).int();
    model.forward(prompt, None, Some(&mut cache), &keep)?;
    let next = Tensor::<B, 2, Int>::from_ints([[7]], &dev);
    let n = if tokens > 1 { 3 } else { 20 };
    let time = |f: &mut dyn FnMut()| {
        f();
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        t.elapsed().as_secs_f64() / n as f64 * 1e3
    };
    let mut c = cache.clone();
    let long = Tensor::<B, 2>::random([1, tokens], Distribution::Uniform(3.0, 1000.0), &dev).int();
    let whole = time(&mut || {
        let (ids, cache) = if tokens > 1 {
            (long.clone(), None)
        } else {
            (next.clone(), Some(&mut c))
        };
        model
            .forward(ids, None, cache, &keep)
            .unwrap()
            .logits
            .into_data();
    });
    let x = Tensor::<B, 3>::random(
        [1, tokens, config.hidden_size],
        Distribution::Normal(0.0, 1.0),
        &dev,
    );
    let masks = LayerMasks {
        attention: None,
        keep: None,
    };
    for (i, layer) in model.layers.iter().enumerate() {
        let kind = model.mixer_kinds()[i];
        let mut c = cache.clone();
        let ms = time(&mut || {
            let cache = if tokens > 1 {
                None
            } else {
                Some(&mut c.layers[i])
            };
            layer.forward(x.clone(), &masks, cache).0.into_data();
        });
        let mixer = time(&mut || {
            let normed = layer.input_layernorm.forward(x.clone());
            if tokens > 1 {
                match &layer.mixer {
                    jamba::layer::Mixer::Mamba(m) => m.forward(normed, None, None).into_data(),
                    jamba::layer::Mixer::Attention(a) => a.forward(normed, None, None).into_data(),
                };
                return;
            }
            match (&layer.mixer, &mut c.layers[i]) {
                (jamba::layer::Mixer::Mamba(m), jamba::cache::LayerCache::Mamba(s)) => {
                    m.forward(normed, None, Some(s)).into_data()
                }
                (jamba::layer::Mixer::Attention(a), jamba::cache::LayerCache::Attention(kv)) => {
                    a.forward(normed, None, Some(kv)).into_data()
                }
                _ => unreachable!(),
            };
        });
        println!(
            "layer {i} {kind:?}: {ms:.3} ms (mixer {mixer:.3} ms)",
            kind = if kind == MixerKind::Attention {
                "attention"
            } else {
                "mamba"
            }
        );
    }
    let h = Tensor::<B, 3>::random(
        [1, 1, config.hidden_size],
        Distribution::Normal(0.0, 1.0),
        &dev,
    );
    let head = time(&mut || {
        jamba::ops::project(model.lm_head.as_ref().unwrap(), h.clone()).into_data();
    });
    println!(
        "lm_head (one row): {head:.3} ms\nwhole {tokens}-token forward: {whole:.3} ms = {:.1} tokens/s",
        1e3 * tokens as f64 / whole
    );
    Ok(())
}
