//! DeepSeek-V3 mixture of experts: sigmoid router with `noaux_tc` group-limited top-k, routed experts
//! run only on the tokens sent to them, plus always-on shared experts.
use candle_core::{DType, Module, Tensor};
use candle_nn::{linear_no_bias, Linear, VarBuilder};

use super::config::DeepseekV3Config;

/// SwiGLU feed-forward (`down(silu(gate(x)) * up(x))`): dense layers, each expert, shared experts.
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    pub fn new(hidden: usize, intermediate: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Mlp {
            gate_proj: linear_no_bias(hidden, intermediate, vb.pp("gate_proj"))?,
            up_proj: linear_no_bias(hidden, intermediate, vb.pp("up_proj"))?,
            down_proj: linear_no_bias(intermediate, hidden, vb.pp("down_proj"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.silu()?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

/// Which parts of the `noaux_tc` rule to apply. The model always routes with both; turning one off
/// shows what it contributes (the fixtures count how many choices change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutePolicy {
    /// Add `e_score_correction_bias` to the scores used for choosing (never to the weights).
    pub correction_bias: bool,
    /// Restrict the choice to the `topk_group` best groups.
    pub group_limit: bool,
}

impl Default for RoutePolicy {
    fn default() -> Self {
        RoutePolicy {
            correction_bias: true,
            group_limit: true,
        }
    }
}

/// The experts one token goes to, best first, with their mixing weights.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRoute {
    pub experts: Vec<usize>,
    /// Sigmoid scores of the chosen experts, normalized (when `norm_topk_prob`) and multiplied by
    /// `routed_scaling_factor`.
    pub weights: Vec<f32>,
}

/// The router (`mlp.gate`): a linear map to one logit per routed expert and the correction bias.
pub struct MoeGate {
    weight: Tensor,
    correction_bias: Vec<f32>,
    n_group: usize,
    topk_group: usize,
    top_k: usize,
    norm_topk_prob: bool,
    routed_scaling_factor: f32,
}

impl MoeGate {
    pub fn new(
        cfg: &DeepseekV3Config,
        experts: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        // Router logits are computed in f32 whatever the weights' dtype, as the reference does.
        let weight = vb
            .get((experts, cfg.hidden_size), "weight")?
            .to_dtype(DType::F32)?;
        let correction_bias = vb
            .get(experts, "e_score_correction_bias")?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        Ok(MoeGate {
            weight,
            correction_bias,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            top_k: cfg.num_experts_per_tok.unwrap_or(1),
            norm_topk_prob: cfg.norm_topk_prob,
            routed_scaling_factor: cfg.routed_scaling_factor as f32,
        })
    }

    /// Route every row of `x: [tokens, hidden]`. Used by the forward pass and exposed so that routing
    /// decisions can be inspected.
    pub fn route(&self, x: &Tensor, policy: RoutePolicy) -> candle_core::Result<Vec<TokenRoute>> {
        let logits = x.to_dtype(DType::F32)?.matmul(&self.weight.t()?)?;
        // The choice is a per-token sort over a few hundred experts: done on the host, where the
        // indices are needed anyway to group tokens per expert.
        let logits: Vec<Vec<f32>> = logits.to_vec2()?;
        Ok(logits
            .iter()
            .map(|row| self.route_row(row, policy))
            .collect())
    }

    fn route_row(&self, logits: &[f32], policy: RoutePolicy) -> TokenRoute {
        let scores: Vec<f32> = logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
        let choice: Vec<f32> = if policy.correction_bias {
            scores
                .iter()
                .zip(&self.correction_bias)
                .map(|(s, b)| s + b)
                .collect()
        } else {
            scores.clone()
        };
        let allowed = if policy.group_limit {
            self.allowed_groups(&choice)
        } else {
            vec![true; self.n_group]
        };
        let group_size = choice.len() / self.n_group;
        let candidates =
            (0..choice.len()).filter(|e| allowed.get(e / group_size).copied().unwrap_or(false));
        let experts = top_indices(candidates, &choice, self.top_k);
        let mut weights: Vec<f32> = experts.iter().map(|&e| scores[e]).collect();
        if self.norm_topk_prob {
            let sum = weights.iter().sum::<f32>() + 1e-20;
            weights.iter_mut().for_each(|w| *w /= sum);
        }
        weights
            .iter_mut()
            .for_each(|w| *w *= self.routed_scaling_factor);
        TokenRoute { experts, weights }
    }

    /// Groups kept by the group limit: the `topk_group` groups whose two best scores sum highest.
    fn allowed_groups(&self, choice: &[f32]) -> Vec<bool> {
        let group_size = choice.len() / self.n_group;
        let group_scores: Vec<f32> = choice
            .chunks(group_size)
            .map(|g| {
                let best = top_indices(0..g.len(), g, 2);
                best.iter().map(|&i| g[i]).sum()
            })
            .collect();
        let mut allowed = vec![false; self.n_group];
        for g in top_indices(0..self.n_group, &group_scores, self.topk_group) {
            allowed[g] = true;
        }
        allowed
    }
}

/// Indices of the `k` largest `values[i]` among `candidates`, best first.
fn top_indices(candidates: impl Iterator<Item = usize>, values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = candidates.collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    idx.truncate(k);
    idx
}

/// Routed experts plus the shared expert(s).
pub struct Moe {
    pub gate: MoeGate,
    experts: Vec<Mlp>,
    shared: Option<Mlp>,
}

impl Moe {
    pub fn new(cfg: &DeepseekV3Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let n = cfg.n_routed_experts.unwrap_or(0);
        let gate = MoeGate::new(cfg, n, vb.pp("gate"))?;
        let experts = (0..n)
            .map(|e| {
                Mlp::new(
                    cfg.hidden_size,
                    cfg.moe_intermediate_size,
                    vb.pp("experts").pp(e),
                )
            })
            .collect::<candle_core::Result<_>>()?;
        let shared = match cfg.n_shared_experts {
            Some(s) if s > 0 => Some(Mlp::new(
                cfg.hidden_size,
                cfg.moe_intermediate_size * s,
                vb.pp("shared_experts"),
            )?),
            _ => None,
        };
        Ok(Moe {
            gate,
            experts,
            shared,
        })
    }

    /// `x: [tokens, hidden]`. Each expert runs once on the rows routed to it (index_select), and its
    /// weighted output is added back to those rows (index_add).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let routes = self.gate.route(x, RoutePolicy::default())?;
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); self.experts.len()];
        let mut weights: Vec<Vec<f32>> = vec![Vec::new(); self.experts.len()];
        for (t, route) in routes.iter().enumerate() {
            for (&e, &w) in route.experts.iter().zip(&route.weights) {
                if let (Some(r), Some(ws)) = (rows.get_mut(e), weights.get_mut(e)) {
                    r.push(t as u32);
                    ws.push(w);
                }
            }
        }
        let mut out = x.zeros_like()?;
        for ((expert, r), ws) in self.experts.iter().zip(rows).zip(weights) {
            if r.is_empty() {
                continue;
            }
            let n = r.len();
            let idx = Tensor::from_vec(r, n, x.device())?;
            let w = Tensor::from_vec(ws, (n, 1), x.device())?.to_dtype(x.dtype())?;
            let y = expert
                .forward(&x.index_select(&idx, 0)?)?
                .broadcast_mul(&w)?;
            out = out.index_add(&idx, &y, 0)?;
        }
        match &self.shared {
            Some(shared) => out + shared.forward(x)?,
            None => Ok(out),
        }
    }
}
