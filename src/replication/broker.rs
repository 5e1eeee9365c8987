//! The embedded MQTT broker (rumqttd), so a node runs with nothing else installed.
//! Behind the default cargo feature `embedded-broker`. For production, Mosquitto or
//! EMQX (docs/DEPLOYMENT.md).

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "cannot start the embedded MQTT broker on {addr}: {source} (is another broker \
         running there? stop it, change [mqtt.embedded_broker] listen, or turn the embedded \
         broker off and set [mqtt] broker_address)"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("this build has no embedded MQTT broker (cargo feature `embedded-broker`)")]
    NotBuilt,
    #[error("cannot start the embedded MQTT broker: {0}")]
    Start(String),
}

/// Start the broker on its own threads (rumqttd's `start` blocks) and return once it
/// accepts connections. `payload_bytes_max` must cover the largest replication payload.
#[cfg(feature = "embedded-broker")]
pub fn start(listen: SocketAddr, payload_bytes_max: usize) -> Result<(), BrokerError> {
    use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
    use std::collections::HashMap;
    // rumqttd only logs a failed bind from inside its thread: find out first, clearly.
    std::net::TcpListener::bind(listen).map_err(|source| BrokerError::Bind {
        addr: listen,
        source,
    })?;
    let packet_max = payload_bytes_max + 4096;
    // rumqttd's defaults are all zero: every size is set here. A segment must hold
    // several of the largest packets; the router keeps `max_segment_count` per topic.
    let router = RouterConfig {
        max_connections: 10_000,
        max_outgoing_packet_count: 1024,
        max_segment_size: (packet_max * 4).max(16 << 20),
        max_segment_count: 4,
        ..RouterConfig::default()
    };
    let server = ServerSettings {
        name: "merkle-kv".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: packet_max,
            max_inflight_count: 1024,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("v4".to_string(), server)])),
        ..Config::default()
    };
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!("embedded MQTT broker stopped: {e}");
            }
        })
        .map_err(|e| BrokerError::Start(e.to_string()))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !answers_connect(listen) {
        if std::time::Instant::now() > deadline {
            return Err(BrokerError::Start(format!(
                "not answering on {listen} after 5 s"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    tracing::info!(%listen, "embedded MQTT broker running");
    Ok(())
}

/// Whether an MQTT broker at `addr` accepts a connection: CONNECT (MQTT 3.1.1, clean
/// session, client id "merkle-kv-probe"), CONNACK, close. A bare TCP probe would
/// make rumqttd log an error for every start.
#[cfg(feature = "embedded-broker")]
fn answers_connect(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    const CONNECT: &[u8] = b"\x10\x1b\x00\x04MQTT\x04\x02\x00\x0a\x00\x0fmerkle-kv-probe";
    let timeout = Some(std::time::Duration::from_secs(1));
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(timeout);
    let mut ack = [0u8; 4];
    s.write_all(CONNECT).is_ok() && s.read_exact(&mut ack).is_ok() && ack[0] == 0x20 && ack[3] == 0
}

#[cfg(not(feature = "embedded-broker"))]
pub fn start(_listen: SocketAddr, _payload_bytes_max: usize) -> Result<(), BrokerError> {
    Err(BrokerError::NotBuilt)
}
