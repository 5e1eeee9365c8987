//! The MQTT connection's setup: client options and TLS (the system's root certificates)
//! from `[mqtt]`, the broker's address, the cluster's topics, and the largest payload a
//! node sends or accepts. Shared by the replication thread and `merkle-kv watch`.

use crate::config::Config;
use crate::replication::link::{PAYLOAD_TARGET_BYTES, UNCONFIRMED_MAX};
use rumqttc::{AsyncClient, EventLoop, MqttOptions};
use std::sync::Arc;
use std::time::Duration;

/// Requests queued to rumqttc at most: the link's whole unconfirmed window twice over
/// (publishes, and as many again of anything else), so handing it a publish never waits.
pub const REQUESTS_MAX: usize = UNCONFIRMED_MAX * 2 + 16;

/// The largest payload a node sends or accepts: a full batch plus one largest event.
pub fn payload_bytes_max(value_bytes_max: usize) -> usize {
    PAYLOAD_TARGET_BYTES + value_bytes_max + 2 * crate::limits::KEY_BYTES_MAX
}

/// Topics of one cluster.
#[derive(Clone)]
pub struct Topics {
    pub updates: String,
    pub nodes: String,
    prefix_len: usize,
}

impl Topics {
    pub fn new(prefix: &str) -> Topics {
        Topics {
            updates: format!("{prefix}/updates"),
            nodes: format!("{prefix}/nodes/+"),
            prefix_len: prefix.len() + "/nodes/".len(),
        }
    }
    pub fn presence(&self, node_id: &str) -> String {
        format!("{}{node_id}", &self.nodes[..self.prefix_len])
    }
    /// The node id of a presence topic.
    pub fn presence_node<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let prefix = &self.nodes[..self.prefix_len];
        topic.strip_prefix(prefix).filter(|id| !id.is_empty())
    }
}

/// Why replication (or `watch`) cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    #[error("mqtt.broker_address {0:?}: {1}")]
    Address(String, String),
    #[error("cannot set up TLS for {0}: {1}")]
    Tls(String, String),
    #[error("cannot start the replication thread: {0}")]
    Thread(std::io::Error),
}

/// MQTT client options from `[mqtt]`; `client_id` may differ from the config's (watch).
pub fn mqtt_options(config: &Config, client_id: &str) -> Result<MqttOptions, ReplError> {
    let m = &config.mqtt;
    let address = broker_address(config);
    let (tls, rest) = match address.split_once("://") {
        Some(("tcp", rest)) => (false, rest),
        Some(("mqtts", rest)) => (true, rest),
        _ => return Err(ReplError::Address(address, "unsupported scheme".into())),
    };
    let (host, port) =
        crate::config::host_port(rest).map_err(|why| ReplError::Address(address.clone(), why))?;
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_keep_alive(Duration::from_secs(m.keep_alive.max(5)))
        .set_clean_session(m.clean_session)
        .set_inflight(UNCONFIRMED_MAX as u16 + 16)
        .set_request_channel_capacity(REQUESTS_MAX);
    // Accept packets well past our own payload limit, so an oversized payload on the
    // topic is rejected and counted by the decoder rather than failing the connection
    // (rumqttc drops the connection on a packet over its limit).
    let max = payload_bytes_max(config.network.max_line_bytes) + 4096;
    o.set_max_packet_size(max * 4, max);
    if let Some(user) = &m.username {
        o.set_credentials(user.clone(), m.password.clone().unwrap_or_default());
    }
    if tls {
        o.set_transport(rumqttc::Transport::tls_with_config(tls_config(&address)?));
    }
    Ok(o)
}

/// The MQTT client for `options`, with `cap` requests queued at most. Nagle is off:
/// a payload or acknowledgement that waits for the previous segment's ACK waits for
/// the peer's delayed ACK (40 ms on Linux), which was most of the replication lag
/// of writes a few milliseconds apart.
pub fn mqtt_client(options: MqttOptions, cap: usize) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options, cap);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// The broker to connect to: `broker_address`, or the embedded broker's listen address.
pub fn broker_address(config: &Config) -> String {
    let m = &config.mqtt;
    if m.broker_address.is_empty() {
        format!("tcp://{}", m.embedded_broker.listen)
    } else {
        m.broker_address.clone()
    }
}

fn tls_config(address: &str) -> Result<rumqttc::TlsConfiguration, ReplError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(ReplError::Tls(
            address.into(),
            "no trusted root certificates found on this system".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ReplError::Tls(address.into(), e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_name_presence_records() {
        let t = Topics::new("a/b");
        assert_eq!(t.updates, "a/b/updates");
        assert_eq!(t.nodes, "a/b/nodes/+");
        assert_eq!(t.presence("n1"), "a/b/nodes/n1");
        assert_eq!(t.presence_node("a/b/nodes/n1"), Some("n1"));
        assert_eq!(t.presence_node("a/b/nodes/"), None);
        assert_eq!(t.presence_node("a/b/updates"), None);
    }
}
