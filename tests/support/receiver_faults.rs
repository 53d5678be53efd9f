//! A receiver that misbehaves on cue: it fails, hangs, stops and comes back (`receiver.rs`).

use serde_json::json;

use super::receiver::Receiver;

impl Receiver {
    /// Stops it: connections to its port are refused until `restart`.
    pub async fn stop(&mut self) {
        self.earlier = self.received().await;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, remembering what it received before.
    pub fn restart(&mut self) {
        self.spawn(self.port);
    }

    /// `ok` (204), `fail` (500) or `hang` (never answers).
    pub async fn set_mode(&self, mode: &str) {
        self.http
            .post(format!("http://127.0.0.1:{}/_mode", self.port))
            .json(&json!({ "mode": mode }))
            .send()
            .await
            .expect("set the receiver's mode");
    }
}
