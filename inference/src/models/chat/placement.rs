//! Where a chat model's layers go and how large its KV pool is.
//!
//! With several GPUs visible, one model's layers are split into contiguous runs, one per GPU, in
//! proportion to each GPU's free memory (pipeline placement: the activations of a step move from one
//! GPU to the next; the KV pool of a layer lives with the layer). A model whose weights do not fit
//! fails at start naming the bytes needed and available. Then the KV pool takes `--kv-cache-memory`
//! bytes, by default [`GPU_KV_FRACTION`] of what the weights leave free on each GPU (less an
//! activation reserve), or [`CPU_KV_DEFAULT_BYTES`] on the CPU.
use candle_core::{DType, Device};

use super::kv::KvShape;

/// Default KV pool on the CPU (pages are only committed as positions are written).
pub const CPU_KV_DEFAULT_BYTES: u64 = 2 << 30;
/// Share of the memory the weights leave free on each GPU that the KV pool takes by default.
pub const GPU_KV_FRACTION: f64 = 0.9;
/// Kept free on each GPU for activations, attention scratch, cuBLAS workspaces and logits.
pub const GPU_ACTIVATION_RESERVE: u64 = 1 << 30;

/// Bytes of the parts of a model, for placement.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelBytes {
    /// Token embeddings (go with the first layer).
    pub head: u64,
    pub layers: Vec<u64>,
    /// Final norm and output projection (go with the last layer).
    pub tail: u64,
}

impl ModelBytes {
    pub fn total(&self) -> u64 {
        self.head + self.layers.iter().sum::<u64>() + self.tail
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("the model needs {needed} bytes of device memory ({weights} of weights plus {reserve} reserved for activations per device) but {available} are free on {devices} ({detail})")]
pub struct DoesNotFit {
    pub needed: u64,
    pub weights: u64,
    pub reserve: u64,
    pub available: u64,
    pub devices: String,
    pub detail: String,
}

/// The device of every layer, plus the devices themselves.
#[derive(Debug, Clone)]
pub struct Placement {
    pub devices: Vec<Device>,
    /// Index into `devices` for each layer.
    pub layer_device: Vec<usize>,
    /// The model's weight bytes the placement was planned for.
    pub weight_bytes: u64,
}

impl Placement {
    /// Everything on one device.
    pub fn single(device: &Device, layers: usize) -> Self {
        Placement {
            devices: vec![device.clone()],
            layer_device: vec![0; layers],
            weight_bytes: 0,
        }
    }

    pub fn layer(&self, i: usize) -> &Device {
        &self.devices[self.layer_device.get(i).copied().unwrap_or(0)]
    }

    /// Where the embeddings live: with the first layer.
    pub fn first(&self) -> &Device {
        self.layer(0)
    }

    /// Where the final norm and output projection live: with the last layer.
    pub fn last(&self) -> &Device {
        self.layer(self.layer_device.len().saturating_sub(1))
    }

    /// Split `bytes` over `devices`. GPUs are sized by their free memory (and a model that does not
    /// fit is refused); CPU "devices" (tests) get equal shares.
    pub fn plan(bytes: &ModelBytes, devices: &[Device]) -> Result<Self, DoesNotFit> {
        let free: Vec<Option<u64>> = devices.iter().map(free_memory).collect();
        let layer_device = if free.iter().all(Option::is_some) {
            let free: Vec<u64> = free.into_iter().flatten().collect();
            place_layers(bytes, &free, GPU_ACTIVATION_RESERVE)
                .map_err(|e| with_names(e, devices))?
        } else {
            even_split(bytes.layers.len(), devices.len().max(1))
        };
        Ok(Placement {
            devices: devices.to_vec(),
            layer_device,
            weight_bytes: bytes.total(),
        })
    }
}

fn with_names(mut e: DoesNotFit, devices: &[Device]) -> DoesNotFit {
    e.devices = devices
        .iter()
        .map(|d| format!("{:?}", d.location()))
        .collect::<Vec<_>>()
        .join(", ");
    e
}

fn even_split(layers: usize, devices: usize) -> Vec<usize> {
    (0..layers).map(|i| i * devices / layers.max(1)).collect()
}

/// Contiguous runs of layers per device, each device's share of the bytes proportional to its free
/// memory less `reserve`, falling back to filling devices in order when the proportional split
/// overflows one. Pure, so that it is tested without GPUs.
pub fn place_layers(
    bytes: &ModelBytes,
    free: &[u64],
    reserve: u64,
) -> Result<Vec<usize>, DoesNotFit> {
    let usable: Vec<u64> = free.iter().map(|f| f.saturating_sub(reserve)).collect();
    let total = bytes.total();
    let capacity: u64 = usable.iter().sum();
    let refuse = |detail: String| DoesNotFit {
        needed: total + reserve * free.len() as u64,
        weights: total,
        reserve,
        available: free.iter().sum(),
        devices: String::new(),
        detail,
    };
    if total > capacity || free.is_empty() {
        return Err(refuse("not enough memory in total".into()));
    }
    // Proportional targets: device d ends where the running total passes its cumulative share.
    let mut cumulative = Vec::with_capacity(usable.len());
    let mut acc = 0u128;
    for u in &usable {
        acc += *u as u128;
        cumulative.push((total as u128 * acc / capacity as u128) as u64);
    }
    let mut assignment = Vec::with_capacity(bytes.layers.len());
    let mut running = bytes.head;
    let mut d = 0;
    for &layer in &bytes.layers {
        let middle = running + layer / 2;
        while d + 1 < usable.len() && middle > cumulative[d] {
            d += 1;
        }
        assignment.push(d);
        running += layer;
    }
    if fits(bytes, &assignment, &usable) {
        return Ok(assignment);
    }
    // Fill in order instead.
    let mut assignment = Vec::with_capacity(bytes.layers.len());
    let (mut d, mut load) = (0, bytes.head);
    for (i, &layer) in bytes.layers.iter().enumerate() {
        let tail = if i + 1 == bytes.layers.len() {
            bytes.tail
        } else {
            0
        };
        while load + layer + tail > usable[d] {
            if d + 1 == usable.len() {
                return Err(refuse(format!(
                    "layer {i} of {} does not fit on any device left",
                    bytes.layers.len()
                )));
            }
            (d, load) = (d + 1, 0);
        }
        assignment.push(d);
        load += layer;
    }
    Ok(assignment)
}

fn fits(bytes: &ModelBytes, assignment: &[usize], usable: &[u64]) -> bool {
    let mut load = vec![0u64; usable.len()];
    if let Some(&first) = assignment.first() {
        load[first] += bytes.head;
    }
    if let Some(&last) = assignment.last() {
        load[last] += bytes.tail;
    }
    for (&d, &b) in assignment.iter().zip(&bytes.layers) {
        load[d] += b;
    }
    load.iter().zip(usable).all(|(l, u)| l <= u)
}

/// Positions the KV pool holds: `budget` bytes over all layers, or the default (see the module
/// docs). `layers`: each layer's KV shape and its device. Refuses budgets that do not fit a GPU.
pub fn kv_tokens(
    budget: Option<u64>,
    layers: &[(KvShape, Device)],
    dtype: DType,
) -> Result<usize, String> {
    let per_token: u64 = layers
        .iter()
        .map(|(s, _)| s.bytes_per_token(dtype) as u64)
        .sum::<u64>()
        .max(1);
    // Per-token bytes and free memory of each GPU holding layers.
    let mut gpus: Vec<(Device, u64, u64)> = Vec::new();
    for (shape, device) in layers {
        let Some(free) = free_memory(device) else {
            continue;
        };
        let bytes = shape.bytes_per_token(dtype) as u64;
        match gpus.iter_mut().find(|(d, _, _)| d.same_device(device)) {
            Some(entry) => entry.1 += bytes,
            None => gpus.push((device.clone(), bytes, free)),
        }
    }
    let tokens = match budget {
        Some(b) => b / per_token,
        None if gpus.is_empty() => CPU_KV_DEFAULT_BYTES / per_token,
        None => gpus
            .iter()
            .map(|(_, bytes, free)| {
                let room = (*free as f64 * GPU_KV_FRACTION) as u64;
                room.saturating_sub(GPU_ACTIVATION_RESERVE) / bytes
            })
            .min()
            .unwrap_or(0),
    };
    for (device, bytes, free) in &gpus {
        let need = tokens * bytes;
        if need + GPU_ACTIVATION_RESERVE > *free {
            return Err(format!(
                "the KV cache needs {need} bytes on {:?} (plus {GPU_ACTIVATION_RESERVE} reserved for activations) but only {free} are free there; lower --kv-cache-memory",
                device.location()
            ));
        }
    }
    if tokens < super::kv::BLOCK_SIZE as u64 {
        return Err(format!(
            "the KV cache holds {tokens} positions ({per_token} bytes each); raise --kv-cache-memory or free device memory"
        ));
    }
    Ok(tokens as usize)
}

/// Free bytes of a GPU; `None` for the CPU.
pub fn free_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _)| free as u64);
    }
    let _ = device;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;

    fn model(layers: usize, each: u64) -> ModelBytes {
        ModelBytes {
            head: GB,
            layers: vec![each; layers],
            tail: GB,
        }
    }

    #[test]
    fn one_device_takes_every_layer() {
        assert_eq!(
            place_layers(&model(4, GB), &[80 * GB], GB).unwrap(),
            vec![0; 4]
        );
    }

    #[test]
    fn equal_devices_split_the_layers_evenly_in_order() {
        let p = place_layers(&model(40, GB / 2), &[80 * GB, 80 * GB], GB).unwrap();
        let on0 = p.iter().filter(|&&d| d == 0).count();
        assert!((19..=21).contains(&on0), "{p:?}");
        assert!(p.windows(2).all(|w| w[0] <= w[1]), "contiguous runs: {p:?}");
    }

    #[test]
    fn a_fuller_device_gets_fewer_layers() {
        let p = place_layers(&model(30, GB), &[10 * GB, 30 * GB], GB).unwrap();
        let on0 = p.iter().filter(|&&d| d == 0).count();
        assert!(on0 < 10, "{p:?}");
        assert!(fits(&model(30, GB), &p, &[9 * GB, 29 * GB]));
    }

    #[test]
    fn a_model_too_large_is_refused_with_bytes_needed_and_available() {
        let e = place_layers(&model(50, GB), &[24 * GB, 24 * GB], GB).unwrap_err();
        assert_eq!(e.weights, 52 * GB);
        assert_eq!(e.needed, 54 * GB);
        assert_eq!(e.available, 48 * GB);
        let msg = e.to_string();
        assert!(
            msg.contains(&(54 * GB).to_string()) && msg.contains(&(48 * GB).to_string()),
            "{msg}"
        );
    }

    #[test]
    fn layers_that_cannot_be_split_are_refused() {
        let bytes = |layers: Vec<u64>| ModelBytes {
            head: 0,
            layers,
            tail: 0,
        };
        let p = place_layers(&bytes(vec![3 * GB; 3]), &[5 * GB; 3], GB).unwrap();
        assert_eq!(p, vec![0, 1, 2]);
        // 12 GB fit in 2 x 6 GB in total, but no run of 4 GB layers does.
        let e = place_layers(&bytes(vec![4 * GB; 3]), &[7 * GB; 2], GB).unwrap_err();
        assert!(e.detail.contains("layer 2"), "{e}");
    }

    #[test]
    fn cpu_devices_share_layers_evenly() {
        let p = Placement::plan(&model(5, GB), &[Device::Cpu, Device::Cpu]).unwrap();
        assert_eq!(p.layer_device, vec![0, 0, 0, 1, 1]);
        assert_eq!(even_split(2, 2), vec![0, 1]);
    }

    #[test]
    fn kv_budget_becomes_positions() {
        let shape = KvShape {
            kv_heads: 2,
            key_dim: 16,
            value_dim: 16,
        };
        let layers = vec![(shape, Device::Cpu); 2];
        // 2 layers x 2 x 2 heads x 16 x 4 bytes = 512 bytes per position.
        assert_eq!(
            kv_tokens(Some(512 * 1000), &layers, DType::F32).unwrap(),
            1000
        );
        assert_eq!(
            kv_tokens(None, &layers, DType::F32).unwrap() as u64,
            CPU_KV_DEFAULT_BYTES / 512
        );
        assert!(kv_tokens(Some(512 * 3), &layers, DType::F32)
            .unwrap_err()
            .contains("--kv-cache-memory"));
    }
}
