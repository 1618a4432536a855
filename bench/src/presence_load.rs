//! `pulse-bench presence-load`: the demo's people. Simulated members of the demo's
//! tenants come online over WebSocket with a JWT, move between pages, subscribe to their
//! tenant's presence, and go offline and come back, until stopped. Not a benchmark: it
//! gives `scripts/demo` (and pulsetop's Presence screen) something live to show.

use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Where and as whom the simulated people connect.
#[derive(Debug, Clone, clap::Args)]
pub struct PresenceLoad {
    /// pulsed's WebSocket URL.
    #[arg(long)]
    pub url: String,
    /// The JWT issuer pulsed trusts (auth.issuer).
    #[arg(long)]
    pub issuer: String,
    /// The HS256 secret pulsed trusts (auth.hs256_secret).
    #[arg(long, env = "PULSE_LOAD_SECRET")]
    pub secret: String,
    /// Tenant ids to spread people over.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    pub tenants: Vec<String>,
    /// People per tenant.
    #[arg(long, default_value_t = 6)]
    pub per_tenant: usize,
}

const PAGES: [&str; 6] = [
    "/dashboard",
    "/members",
    "/events",
    "/payments",
    "/events/3",
    "/members/12",
];

/// Runs until the process is stopped.
pub async fn run(load: PresenceLoad) -> Result<()> {
    let mut people = Vec::new();
    for (t, tenant) in load.tenants.iter().enumerate() {
        for n in 0..load.per_tenant {
            // Member ids of the demo's seed: 60 per tenant, in tenant order.
            let user = (t * 60 + n + 1).to_string();
            let role = if n == 0 {
                "ROLE_ADMIN"
            } else if n < 3 {
                "ROLE_STAFF"
            } else {
                "ROLE_MEMBER"
            };
            people.push(tokio::spawn(person(load.clone(), user, tenant.clone(), role)));
        }
    }
    for p in people {
        p.await?;
    }
    Ok(())
}

/// One person: online for a while, moving between pages, then offline for a while.
async fn person(load: PresenceLoad, user: String, tenant: String, role: &'static str) {
    loop {
        if let Err(e) = session(&load, &user, &tenant, role).await {
            eprintln!("presence-load: {user}@{tenant}: {e:#}");
        }
        let away = rand::rng().random_range(5..40);
        tokio::time::sleep(Duration::from_secs(away)).await;
    }
}

async fn session(load: &PresenceLoad, user: &str, tenant: &str, role: &str) -> Result<()> {
    let mut ws = crate::ws::connect(&load.url).await.context("connect")?;
    let hello = json!({ "type": "hello", "protocol": 1, "token": crate::jwt::hs256(&load.secret, &load.issuer, user, tenant, role) });
    ws.send(Message::Text(hello.to_string().into())).await?;
    ws.send(Message::Text(
        json!({ "type": "subscribe", "id": "p", "query": "presence" })
            .to_string()
            .into(),
    ))
    .await?;
    let (stay, mut page) = {
        let mut rng = rand::rng();
        (rng.random_range(20..120u64), rng.random_range(0..PAGES.len()))
    };
    let until = tokio::time::Instant::now() + Duration::from_secs(stay);
    let mut beat = tokio::time::interval(Duration::from_secs(5));
    while tokio::time::Instant::now() < until {
        tokio::select! {
            _ = beat.tick() => {
                if rand::rng().random_bool(0.3) {
                    page = rand::rng().random_range(0..PAGES.len());
                }
                let frame = json!({ "type": "heartbeat", "resource": PAGES[page], "state": { "role": role } });
                ws.send(Message::Text(frame.to_string().into())).await?;
            }
            msg = ws.next() => match msg {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            },
        }
    }
    ws.close(None).await.ok();
    Ok(())
}
