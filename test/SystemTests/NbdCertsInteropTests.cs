using System.Diagnostics;

namespace NbdServer.SystemTests;

/// <summary>
/// The directories nbd-certs writes are GnuTLS's layout with extensions GnuTLS accepts: qemu-nbd
/// serves with them (verifying client certificates), qemu-io and libnbd connect with them, and a
/// client certificate from another CA is turned away. (The NBD frontend's own TLS uses the same
/// directories.)
/// </summary>
[TestFixture]
[Category("Tls")]
[CancelAfter(120_000)]
public sealed class NbdCertsInteropTests
{
    [Test]
    public async Task Nbd_certs_directories_work_with_qemu_nbd_qemu_io_and_libnbd()
    {
        string qemuNbd = RealClient.Require("/usr/bin/qemu-nbd", "qemu-utils");
        string nbdinfo = RealClient.Require("/usr/bin/nbdinfo", "libnbd-bin");
        using var scratch = new ScratchDirectory("certs-interop");
        string ca = scratch.File("ca");
        string server = scratch.File("server");
        string client = scratch.File("client");
        string stranger = scratch.File("stranger");
        await ReplicatedVolumeFixture.CertsAsync("ca", "--dir", ca);
        await ReplicatedVolumeFixture.CertsAsync("server", "--ca", ca, "--name", "localhost", "--out", server);
        await ReplicatedVolumeFixture.CertsAsync("client", "--ca", ca, "--name", "upstairs", "--out", client);
        await ReplicatedVolumeFixture.CertsAsync("ca", "--dir", scratch.File("ca2"));
        await ReplicatedVolumeFixture.CertsAsync("client", "--ca", scratch.File("ca2"), "--name", "upstairs", "--out", stranger);
        // The stranger trusts our server's CA but holds a certificate from its own.
        File.Copy(Path.Combine(ca, "ca-cert.pem"), Path.Combine(stranger, "ca-cert.pem"), overwrite: true);

        string image = scratch.File("disk.img");
        await using (FileStream f = File.Create(image))
        {
            f.SetLength(16L << 20);
        }
        // A Unix socket: no port to pick, nothing reachable from the network.
        string socket = scratch.File("nbd.sock");
        using Process served = RealClient.Start(qemuNbd, "--object", $"tls-creds-x509,id=tls0,dir={server},endpoint=server,verify-peer=on",
            "--tls-creds", "tls0", "-f", "raw", "--socket", socket, "-x", "vol0", "-t", image);
        try
        {
            Assert.That(await RealClient.WaitUntilAsync(() => File.Exists(socket), TimeSpan.FromSeconds(20)), Is.True, "qemu-nbd did not start");

            ExternalTool.Result io = await RealClient.RunAsync("/usr/bin/qemu-io", ["--object", $"tls-creds-x509,id=tls0,dir={client},endpoint=client",
                "--image-opts", $"driver=nbd,server.type=unix,server.path={socket},export=vol0,tls-creds=tls0,tls-hostname=localhost",
                "-c", "write -P 0x6b 0 1M", "-c", "read -P 0x6b 0 1M"]);
            Assert.That(io.ExitCode, Is.EqualTo(0), io.ToString());
            Assert.That(io.Output + io.Error, Does.Not.Contain("fail").And.Not.Contain("error"), io.ToString());

            ExternalTool.Result info = await RealClient.RunAsync(nbdinfo, ["--json", $"nbds+unix:///vol0?socket={socket}&tls-certificates={client}&tls-hostname=localhost"]);
            Assert.That(info.ExitCode, Is.EqualTo(0), info.ToString());
            Assert.That(info.Output, Does.Contain("\"TLS\": true"));

            ExternalTool.Result refused = await RealClient.RunAsync(nbdinfo, [$"nbds+unix:///vol0?socket={socket}&tls-certificates={stranger}&tls-hostname=localhost"]);
            Assert.That(refused.ExitCode, Is.Not.EqualTo(0), "a client certificate from another CA is refused: " + refused);
        }
        finally
        {
            served.Kill();
            await served.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(10));
        }
    }
}
