//! A TCP relay on loopback that a test can cut and heal, standing for one simulated device's
//! network link: its listener is bound once and kept (its port is never chosen first and bound
//! later). Cut, it forwards nothing either way and connects nothing new, but drops no byte and
//! closes no connection: what a pulled cable does to TCP. Healed, the queued bytes flow on, or
//! the client, having given up on its keep-alive meanwhile, reconnects. Everything it runs
//! stops when it is dropped.

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running relay to one upstream address.
pub struct Relay {
    /// The loopback address clients connect to.
    pub address: SocketAddr,
    open: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Listens on 127.0.0.1 (a port the kernel picks, kept) and forwards each connection to
    /// `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let address = listener.local_addr()?;
        let (open, link) = watch::channel(true);
        let task = tokio::spawn(accept(listener, upstream, link));
        Ok(Self {
            address,
            open,
            task,
        })
    }

    /// Stops all traffic, both ways, until [`Relay::heal`].
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Lets traffic flow again.
    pub fn heal(&self) {
        self.open.send_replace(true);
    }

    /// Whether traffic is stopped.
    pub fn is_cut(&self) -> bool {
        !*self.open.borrow()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The accept task owns the connections' tasks: they go with it.
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, link: watch::Receiver<bool>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    connections.spawn(forward(client, upstream, link.clone()));
                }
                // Out of file descriptors, most likely: no busy loop while it lasts.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

/// Waits while the link is cut.
async fn link_up(link: &mut watch::Receiver<bool>) -> bool {
    link.wait_for(|open| *open).await.is_ok()
}

async fn forward(client: TcpStream, upstream: SocketAddr, mut link: watch::Receiver<bool>) {
    if !link_up(&mut link).await {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Either direction ending ends both: a closed side closes the other.
    tokio::select! {
        _ = pump(client_read, server_write, link.clone()) => {}
        _ = pump(server_read, client_write, link) => {}
    }
}

/// Copies `from` to `to`, holding each chunk while the link is cut (before reading it, and
/// before writing what was read).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !link_up(&mut link).await {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !link_up(&mut link).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_cut_holds_the_bytes_and_a_heal_delivers_them() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let relay = Relay::start(upstream).await.unwrap();
        let mut c = TcpStream::connect(relay.address).await.unwrap();
        let mut got = [0u8; 5];
        c.write_all(b"hello").await.unwrap();
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");

        relay.cut();
        assert!(relay.is_cut());
        c.write_all(b"again").await.unwrap();
        let held = tokio::time::timeout(Duration::from_millis(300), c.read(&mut got)).await;
        assert!(held.is_err(), "bytes crossed a cut link: {held:?}");
        relay.heal();
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(
            &got, b"again",
            "the held bytes arrive once healed, none lost"
        );
    }
}
