use clap::Parser;
use meshless::{app, config::Config};

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    app::init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("meshless: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(app::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("meshless: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
