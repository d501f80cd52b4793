//! Owned fields edited by hand are put back; a child the API server refuses lands in status.

use super::*;

#[tokio::test]
async fn a_hand_edit_is_put_back_although_the_spec_hash_matches() {
    let (ctx, mut api) = context();
    let mut edited = live_deployment(&model(GPU_SPEC), 3);
    let m = settled(GPU_SPEC, &edited);
    // `kubectl scale deployment qwen --replicas 7`: a new version, the operator's hash intact.
    edited.metadata.resource_version = Some("101".into());
    if let Some(spec) = edited.spec.as_mut() {
        spec.replicas = Some(7);
    }
    let restored = to_value(&live_deployment(&m, 3));
    let svc = live_service(&m);
    let server = tokio::spawn(async move {
        api.get(SVC_PATH, Some(svc)).await;
        api.get(DEPLOY_PATH, Some(to_value(&edited))).await;
        let applied = api.apply_answering(DEPLOY_PATH, &restored).await;
        assert_eq!(applied["spec"]["replicas"], 3);
        let event = api.event().await;
        assert_eq!(event["note"], "Scaled from 7 to 3 replicas");
        api
    });
    run_reconcile(m, ctx.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        ctx.metrics.applies.with_label_values(&["Deployment"]).get(),
        1
    );
    let api = server.await.unwrap_or_else(|e| panic!("{e}"));
    drop(ctx);
    api.done().await;
}

#[tokio::test]
async fn a_refused_child_is_reported_in_status_and_events() {
    let (ctx, mut api) = context();
    let m = model(GPU_SPEC);
    let invalid = "Deployment.apps \"qwen\" is invalid: spec.template.spec.containers[0].resources.requests: Invalid value: \"64Gi\": must be less than or equal to memory limit of 48Gi";
    let server = tokio::spawn(async move {
        api.get(SVC_PATH, None).await;
        api.apply(SVC_PATH, json!({})).await;
        api.get(DEPLOY_PATH, None).await;
        api.fail_with(
            Method::PATCH,
            DEPLOY_PATH,
            StatusCode::UNPROCESSABLE_ENTITY,
            invalid,
        )
        .await;
        // What serves now, if anything: nothing yet.
        api.get(DEPLOY_PATH, None).await;
        let status = api.apply(STATUS_PATH, json!({})).await;
        let ready = condition(&status, "Ready");
        assert_eq!(
            (&ready["status"], &ready["reason"], &ready["message"]),
            (&json!("False"), &json!("ApplyFailed"), &json!(invalid))
        );
        assert_eq!(condition(&status, "Degraded")["reason"], "ApplyFailed");
        let event = api.event().await;
        assert_eq!(
            (&event["type"], &event["reason"], &event["note"]),
            (&json!("Warning"), &json!("ApplyFailed"), &json!(invalid))
        );
        api
    });
    let model = Arc::new(m);
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        reconcile(model.clone(), ctx.clone()),
    )
    .await
    .unwrap_or_else(|_| panic!("hung"))
    .expect_err("a refused child fails the reconcile (retried with backoff)");
    assert_eq!(err.metric_label(), "api_422");
    assert_eq!(
        error_policy(model, &err, ctx.clone()),
        Action::requeue(BACKOFF_BASE)
    );
    let api = server.await.unwrap_or_else(|e| panic!("{e}"));
    drop(ctx);
    api.done().await;
}
