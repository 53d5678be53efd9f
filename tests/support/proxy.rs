//! A TCP forwarder that can be cut, the way an unreachable Stripe looks to a client.

use std::sync::Arc;

use super::AbortOnDrop;

/// A TCP forwarder to a real server that can be cut: while down it refuses nothing but
/// closes every connection at once, the way an unreachable Stripe looks to a client.
pub struct CuttableProxy {
    pub url: String,
    up: Arc<std::sync::atomic::AtomicBool>,
    _task: AbortOnDrop,
}

impl CuttableProxy {
    pub async fn start(target: &str) -> Self {
        let target = target
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = up.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let flag = flag.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    // Cut live connections too when the proxy goes down.
                    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                    tokio::pin!(copy);
                    loop {
                        tokio::select! {
                            _ = &mut copy => return,
                            _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {
                                if !flag.load(std::sync::atomic::Ordering::SeqCst) { return; }
                            }
                        }
                    }
                });
            }
        });
        Self {
            url,
            up,
            _task: AbortOnDrop(task),
        }
    }

    /// Cuts or restores the link; returns once live connections have seen it.
    pub async fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    }
}
