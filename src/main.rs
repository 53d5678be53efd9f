#[tokio::main]
async fn main() -> std::process::ExitCode {
    billsync::cli::run().await
}
