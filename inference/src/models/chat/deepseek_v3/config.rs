//! `config.json` of `DeepseekV3ForCausalLM` checkpoints (DeepSeek-V3, V3.1, R1).
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct DeepseekV3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense MLP of the first `first_k_dense_replace` layers.
    pub intermediate_size: usize,
    /// Width of one routed expert (and, times `n_shared_experts`, of the shared expert).
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub n_shared_experts: Option<usize>,
    #[serde(default)]
    pub n_routed_experts: Option<usize>,
    #[serde(default = "one_f64")]
    pub routed_scaling_factor: f64,
    #[serde(default = "one")]
    pub n_group: usize,
    #[serde(default = "one")]
    pub topk_group: usize,
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
    #[serde(default)]
    pub first_k_dense_replace: usize,
    #[serde(default = "one")]
    pub moe_layer_freq: usize,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default = "sigmoid")]
    pub scoring_func: String,
    #[serde(default = "noaux_tc")]
    pub topk_method: String,
    /// `None` (DeepSeek-V2-Lite style): queries come from a plain `q_proj`.
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub rms_norm_eps: f64,
    #[serde(default = "rope_theta")]
    pub rope_theta: f64,
    /// Legacy key; transformers 5 writes the same object as `rope_parameters`.
    #[serde(default, alias = "rope_parameters")]
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "silu")]
    pub hidden_act: String,
    /// Rotation on interleaved pairs `(2i, 2i+1)`, as the released checkpoints are trained.
    #[serde(default = "yes")]
    pub rope_interleave: bool,
    /// The released DeepSeek-V3/R1 checkpoints are FP8 with block scales (`weight_scale_inv`);
    /// reading them as plain weights would be silently wrong, so they are refused.
    #[serde(default)]
    pub quantization_config: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RopeScaling {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub beta_fast: Option<f64>,
    #[serde(default)]
    pub beta_slow: Option<f64>,
    #[serde(default)]
    pub mscale: Option<f64>,
    #[serde(default)]
    pub mscale_all_dim: Option<f64>,
    #[serde(default)]
    pub attention_factor: Option<f64>,
    /// transformers 5 moves `rope_theta` in here.
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

impl RopeScaling {
    pub fn is_yarn(&self) -> bool {
        self.rope_type.as_deref() == Some("yarn")
    }
}

impl DeepseekV3Config {
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    pub fn rope_base(&self) -> f64 {
        self.rope_scaling
            .as_ref()
            .and_then(|r| r.rope_theta)
            .unwrap_or(self.rope_theta)
    }

    /// Yarn scaling, the only scaling the DeepSeek-V3 family uses; `None` for plain rope.
    pub fn yarn(&self) -> Option<&RopeScaling> {
        self.rope_scaling.as_ref().filter(|r| r.is_yarn())
    }

    /// Whether decoder layer `i` has routed experts (otherwise a dense MLP).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.n_routed_experts.is_some()
            && i >= self.first_k_dense_replace
            && i.is_multiple_of(self.moe_layer_freq.max(1))
    }

    /// Reject settings this implementation does not compute, with a message for the operator.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(q) = &self.quantization_config {
            let method = q
                .get("quant_method")
                .and_then(|m| m.as_str())
                .unwrap_or("unknown");
            return Err(format!(
                "quantization_config {method} is not supported: convert the checkpoint to bf16 \
                 first (DeepSeek ships fp8_cast_bf16.py for this)"
            ));
        }
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act {:?} is not supported (only silu)",
                self.hidden_act
            ));
        }
        if self.n_routed_experts.is_some() {
            if self.scoring_func != "sigmoid" || self.topk_method != "noaux_tc" {
                return Err(format!(
                    "routing scoring_func={:?} topk_method={:?} is not supported (DeepSeek-V3 uses sigmoid + noaux_tc)",
                    self.scoring_func, self.topk_method
                ));
            }
            let experts = self.n_routed_experts.unwrap_or(0);
            if self.n_group == 0
                || !experts.is_multiple_of(self.n_group)
                || self.topk_group > self.n_group
            {
                return Err(format!(
                    "n_routed_experts {experts} is not split evenly into n_group {} (topk_group {})",
                    self.n_group, self.topk_group
                ));
            }
            let k = self.num_experts_per_tok.unwrap_or(0);
            if k == 0 || k > experts {
                return Err(format!("num_experts_per_tok {k} must be in 1..={experts}"));
            }
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(format!(
                "qk_rope_head_dim {} must be even",
                self.qk_rope_head_dim
            ));
        }
        if let Some(r) = &self.rope_scaling {
            if !r.is_yarn() && r.rope_type.as_deref().is_some_and(|t| t != "default") {
                return Err(format!(
                    "rope scaling {:?} is not supported (only yarn)",
                    r.rope_type
                ));
            }
        }
        Ok(())
    }
}

fn one() -> usize {
    1
}
fn one_f64() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn rope_theta() -> f64 {
    10_000.0
}
fn sigmoid() -> String {
    "sigmoid".into()
}
fn noaux_tc() -> String {
    "noaux_tc".into()
}
fn silu() -> String {
    "silu".into()
}
