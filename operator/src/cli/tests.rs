use std::collections::BTreeSet;

use clap::CommandFactory;
use k8s_openapi::api::apps::v1::Deployment;
use serde::Deserialize;

use super::*;

/// Env twins of every flag of a subcommand.
fn envs_of(subcommand: &str) -> BTreeSet<String> {
    let cmd = Cli::command();
    let sub = cmd
        .find_subcommand(subcommand)
        .unwrap_or_else(|| panic!("no {subcommand} subcommand"));
    sub.get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect()
}

#[test]
fn every_flag_has_an_env_twin() {
    let cmd = Cli::command();
    for name in ["controller", "gateway", "render"] {
        let sub = cmd
            .find_subcommand(name)
            .unwrap_or_else(|| panic!("no {name} subcommand"));
        let missing: Vec<_> = sub
            .get_arguments()
            .filter(|a| a.get_long().is_some() && a.get_env().is_none())
            // render's own flags (-f, -n) are per invocation; its build flags have twins.
            .filter(|a| {
                !(name == "render"
                    && ["file", "namespace", "service_monitor"].contains(&a.get_id().as_str()))
            })
            .map(|a| a.get_id().to_string())
            .collect();
        assert!(
            missing.is_empty(),
            "{name}: flags without env twin: {missing:?}"
        );
    }
}

/// Every Deployment of the rendered chart runs a subcommand (its first argument) and sets
/// only environment variables that subcommand reads.
#[test]
fn the_chart_sets_only_env_vars_its_subcommands_read() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/glm-operator.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let deployments: Vec<Deployment> = serde_yaml::Deserializer::from_str(&text)
        .filter_map(|doc| serde_yaml::Value::deserialize(doc).ok())
        .filter(|v| v.get("kind").and_then(|k| k.as_str()) == Some("Deployment"))
        .filter_map(|v| serde_yaml::from_value::<Deployment>(v).ok())
        .collect();
    let mut commands = BTreeSet::new();
    for deployment in deployments {
        let containers = deployment
            .spec
            .and_then(|s| s.template.spec)
            .map(|p| p.containers)
            .unwrap_or_default();
        for container in containers {
            let command = container.args.clone().unwrap_or_default().remove(0);
            let known = envs_of(&command);
            let names: Vec<String> = container
                .env
                .iter()
                .flatten()
                .map(|e| e.name.clone())
                .collect();
            assert!(names.len() > 4, "{command}: {names:?}");
            for name in names {
                // RUST_LOG is read by tracing's EnvFilter, not by clap.
                assert!(
                    name == "RUST_LOG" || known.contains(&name),
                    "the chart sets {name}, which `glm-operator {command}` does not read"
                );
            }
            commands.insert(command);
        }
    }
    assert_eq!(
        commands,
        BTreeSet::from(["controller".to_owned(), "gateway".to_owned()])
    );
}

#[test]
fn controller_is_the_default_and_run_its_alias() {
    let cli = Cli::try_parse_from([
        "glm-operator",
        "--leader-election",
        "false",
        "--api-port",
        "9000",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(cli.command.is_none());
    assert!(!cli.run.leader_election);
    assert_eq!(cli.run.build.api_port, 9000);
    let run = Cli::try_parse_from(["glm-operator", "run", "--default-cuda-image", "r/x:1-cuda"])
        .unwrap_or_else(|e| panic!("{e}"));
    match run.command {
        Some(Command::Controller(args)) => {
            assert_eq!(args.build.default_cuda_image, "r/x:1-cuda")
        }
        other => panic!("parsed {other:?}"),
    }
    let render = Cli::try_parse_from(["glm-operator", "render", "-f", "m.yaml", "-n", "ai"])
        .unwrap_or_else(|e| panic!("{e}"));
    match render.command {
        Some(Command::Render(args)) => assert_eq!(args.namespace, "ai"),
        other => panic!("parsed {other:?}"),
    }
}

#[test]
fn the_gateway_takes_only_gateway_flags() {
    let cli = Cli::try_parse_from([
        "glm-operator",
        "gateway",
        "--gateway-port",
        "18080",
        "--gateway-connect-to",
        "a.b.svc:8200=127.0.0.1:1,c.d.svc:8200=127.0.0.1:2",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    match cli.command {
        Some(Command::Gateway(args)) => {
            assert_eq!(args.gateway.gateway_port, 18080);
            assert_eq!(args.gateway.gateway_connect_to.len(), 2);
        }
        other => panic!("parsed {other:?}"),
    }
    // Leader election is the controller's business.
    assert!(Cli::try_parse_from(["glm-operator", "gateway", "--leader-election", "true"]).is_err());
}

#[test]
fn lease_timings_must_nest() {
    let ok = |l, r, p| lease_timings_valid(l, r, p).is_ok();
    assert!(ok(15, 10, 2));
    assert!(!ok(10, 10, 2));
    assert!(!ok(15, 2, 2));
    assert!(!ok(15, 10, 0));
}
