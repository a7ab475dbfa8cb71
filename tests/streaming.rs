//! Streaming without buffering, proved in lockstep: the mock upstream sends
//! frame k+1 only after the client has received frame k through keyrelay, so
//! any buffering would deadlock the test (and fail it at the step timeout)
//! instead of merely slowing it down.

mod support;

use bytes::Bytes;
use http::Request;
use support::*;

#[tokio::test]
async fn raw_chunked_tokens_arrive_one_by_one() {
    let mut upstream = MockUpstream::start().await;
    let relay = Relay::start(&upstream.url(), &[]).await;
    let client = http1_client();

    let request = Request::post(relay.url("/production/predict"))
        .body(full(r#"{"prompt": "hi", "stream": true}"#))
        .expect("request");
    let pending = tokio::spawn(client.request(request));
    let exchange = upstream.next().await;
    let (mut tx, _dropped) = exchange.respond_streaming_with(
        http::Response::builder().header("content-type", "application/octet-stream"),
    );
    let response = within("response headers", pending)
        .await
        .expect("join")
        .expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["transfer-encoding"], "chunked");
    let mut body = response.into_body();

    for k in 0..50 {
        let token = Bytes::from(format!(" token{k}"));
        tx.send_data(token.clone()).await.expect("send");
        let got = next_data(&mut body).await.expect("frame").expect("data");
        assert_eq!(got, token, "frame {k} arrived alone and intact");
    }
    drop(tx);
    assert!(next_data(&mut body).await.is_none(), "stream ends cleanly");
    relay.stop().await;
}
