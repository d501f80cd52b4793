use super::*;

#[test]
fn model_specs_parse_and_reject_garbage() {
    let m: ModelSpec = "minilm=.models/all-MiniLM-L6-v2".parse().unwrap();
    assert_eq!(m.name, "minilm");
    assert_eq!(m.path, PathBuf::from(".models/all-MiniLM-L6-v2"));
    // Only the first '=' separates: paths may contain '='.
    let m: ModelSpec = "a=/x=y".parse().unwrap();
    assert_eq!(m.path, PathBuf::from("/x=y"));
    assert!("noequals".parse::<ModelSpec>().is_err());
    assert!("=path".parse::<ModelSpec>().is_err());
    assert!("name=".parse::<ModelSpec>().is_err());
}

#[test]
fn flags_parse_with_defaults_and_duplicates_are_refused() {
    let args =
        Args::try_parse_from(["glm-inference", "--model", "a=/x", "--model", "b=/y"]).unwrap();
    assert_eq!(args.models.len(), 2);
    assert_eq!(args.port, 8200);
    assert!(args.validate().is_ok());
    let args =
        Args::try_parse_from(["glm-inference", "--model", "a=/x", "--model", "a=/y"]).unwrap();
    assert!(args.validate().unwrap_err().contains("`a`"));
    let args = Args::try_parse_from([
        "glm-inference",
        "--model",
        "a=/x",
        "--max-batch-tokens",
        "0",
    ])
    .unwrap();
    assert!(args.validate().unwrap_err().contains("--max-batch-tokens"));
    let args = Args::try_parse_from([
        "glm-inference",
        "--model",
        "a=/x",
        "--max-client-batch-size",
        "9",
        "--max-queued-inputs",
        "8",
    ])
    .unwrap();
    assert!(args
        .validate()
        .unwrap_err()
        .contains("--max-queued-inputs (8)"));
    assert!(
        Args::try_parse_from(["glm-inference"]).is_err(),
        "--model is required"
    );
}

#[test]
fn limit_flags_default_to_the_library_defaults_and_parse() {
    let args = Args::try_parse_from(["glm-inference", "--model", "a=/x"]).unwrap();
    let (limits, defaults) = (args.limits(), Limits::default());
    assert_eq!(limits.keyword, defaults.keyword);
    assert_eq!(limits.chat, defaults.chat);
    assert_eq!(limits.body_read_timeout, defaults.body_read_timeout);
    assert_eq!(
        (limits.max_client_batch_size, limits.max_body_bytes),
        (defaults.max_client_batch_size, defaults.max_body_bytes)
    );
    assert_eq!(args.serve_config(), ServeConfig::default());
    let args = Args::try_parse_from([
        "glm-inference",
        "--model",
        "a=/x",
        "--keyword-max-candidates",
        "7",
        "--chat-max-tokens",
        "99",
        "--header-read-timeout-secs",
        "3",
    ])
    .unwrap();
    assert_eq!(args.limits().keyword.max_candidates, 7);
    assert_eq!(args.limits().chat.max_tokens, 99);
    assert_eq!(
        args.serve_config().header_read_timeout,
        Duration::from_secs(3)
    );
    let args = Args::try_parse_from([
        "glm-inference",
        "--model",
        "a=/x",
        "--body-read-timeout-secs",
        "0",
    ])
    .unwrap();
    assert!(args
        .validate()
        .unwrap_err()
        .contains("--body-read-timeout-secs"));
}

#[test]
fn an_empty_api_key_is_refused() {
    let parse = |extra: &[&str]| {
        let mut argv = vec!["glm-inference", "--model", "a=/x"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    };
    assert!(parse(&["--api-key", ""]).check_api_key(false).is_err());
    assert!(parse(&["--api-key", "  "]).check_api_key(false).is_err());
    // API_KEY= in the environment: clap reports no value, the variable exists.
    let err = parse(&[]).check_api_key(true).unwrap_err();
    assert!(err.contains("API_KEY"), "{err}");
    assert!(parse(&[]).check_api_key(false).is_ok());
    assert!(parse(&["--api-key", "k"]).check_api_key(true).is_ok());
}

#[test]
fn device_choice_parses_and_cpu_builds_refuse_cuda() {
    let args = Args::try_parse_from(["glm-inference", "--model", "a=/x"]).unwrap();
    assert_eq!(args.device, DeviceChoice::Auto);
    let args =
        Args::try_parse_from(["glm-inference", "--model", "a=/x", "--device", "cpu"]).unwrap();
    assert!(matches!(args.device.open(), Ok(Device::Cpu)));
    assert!(Args::try_parse_from(["glm-inference", "--model", "a=/x", "--device", "gpu"]).is_err());
    #[cfg(not(feature = "cuda"))]
    {
        assert!(matches!(DeviceChoice::Auto.open(), Ok(Device::Cpu)));
        let err = DeviceChoice::Cuda.open().unwrap_err();
        assert!(err.contains("--features cuda"), "{err}");
    }
}

#[test]
fn kv_memory_load_format_and_dtype_parse() {
    assert_eq!("1048576".parse::<ByteSize>(), Ok(ByteSize(1 << 20)));
    assert_eq!("8GiB".parse::<ByteSize>(), Ok(ByteSize(8 << 30)));
    assert_eq!("2 GB".parse::<ByteSize>(), Ok(ByteSize(2_000_000_000)));
    assert!("8 parsecs"
        .parse::<ByteSize>()
        .unwrap_err()
        .contains("unit"));
    assert!("GiB".parse::<ByteSize>().is_err());
    let args = Args::try_parse_from([
        "glm-inference",
        "--model",
        "a=/x",
        "--kv-cache-memory",
        "64MiB",
        "--load-format",
        "dummy",
        "--dtype",
        "bf16",
    ])
    .unwrap();
    let o = args.chat_load_options(vec![Device::Cpu]);
    assert_eq!(o.kv_cache_memory, Some(64 << 20));
    assert_eq!(o.load_format, crate::models::chat::LoadFormat::Dummy);
    assert_eq!(o.dtype(), candle_core::DType::BF16);
    let defaults = Args::try_parse_from(["glm-inference", "--model", "a=/x"]).unwrap();
    let o = defaults.chat_load_options(vec![Device::Cpu]);
    assert_eq!(
        (o.kv_cache_memory, o.dtype()),
        (None, candle_core::DType::F32)
    );
    assert!(Args::try_parse_from([
        "glm-inference",
        "--model",
        "a=/x",
        "--load-format",
        "random"
    ])
    .is_err());
}

#[test]
fn embed_kernels_default_to_packed_and_reject_unknown_values() {
    use crate::models::embed::EncoderKernels;
    let parse = |extra: &[&str]| {
        Args::try_parse_from(["glm-inference", "--model", "a=/x"].iter().chain(extra))
            .map(|a| a.embed_kernels)
            .map_err(|e| e.to_string())
    };
    assert_eq!(parse(&[]), Ok(EncoderKernels::Packed));
    assert_eq!(
        parse(&["--embed-kernels", "candle"]),
        Ok(EncoderKernels::Candle)
    );
    let err = parse(&["--embed-kernels", "onnx"]).unwrap_err();
    assert!(err.contains("not one of packed, candle"), "{err}");
}

#[test]
fn gguf_mode_defaults_to_auto_and_rejects_unknown_values() {
    use crate::models::chat::gguf::GgufMode;
    let args = Args::try_parse_from(["glm-inference", "--model", "a=/x"]).unwrap();
    assert_eq!(args.gguf_mode, GgufMode::Auto);
    let args = Args::try_parse_from([
        "glm-inference",
        "--model",
        "a=/x",
        "--gguf-mode",
        "quantized",
    ])
    .unwrap();
    assert_eq!(args.gguf_mode, GgufMode::Quantized);
    let err = Args::try_parse_from(["glm-inference", "--model", "a=/x", "--gguf-mode", "q4"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not one of auto, quantized, dequantized"),
        "{err}"
    );
}

#[test]
fn chat_engine_limits_come_from_flags_and_must_be_positive() {
    let args = Args::try_parse_from(["glm-inference", "--model", "a=/x"]).unwrap();
    assert_eq!(args.engine_config(), crate::engine::EngineConfig::default());
    let args = Args::try_parse_from([
        "glm-inference",
        "--model",
        "a=/x",
        "--chat-max-batch-size",
        "2",
        "--chat-max-batch-tokens",
        "64",
        "--chat-max-waiting",
        "3",
    ])
    .unwrap();
    let config = args.engine_config();
    assert_eq!(
        (
            config.max_batch_size,
            config.max_batch_tokens,
            config.max_waiting
        ),
        (2, 64, 3)
    );
    let args = Args::try_parse_from([
        "glm-inference",
        "--model",
        "a=/x",
        "--chat-max-waiting",
        "0",
    ])
    .unwrap();
    assert!(args.validate().unwrap_err().contains("--chat-max-waiting"));
}
