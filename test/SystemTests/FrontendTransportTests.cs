using System.Net;
using System.Runtime.Versioning;
using System.Security.Cryptography.X509Certificates;
using NbdServer.Common.Tls;

namespace NbdServer.SystemTests;

/// <summary>
/// The NBD frontend's transports with real clients: a Unix socket (libnbd's nbd+unix://, qemu-io) and
/// STARTTLS (libnbd's nbds:// with a tls-certificates directory, nbdcopy, qemu's tls-creds-x509).
/// One directory in the GnuTLS layout serves the server (server-*.pem) and the clients (client-*.pem).
/// </summary>
[TestFixture]
[CancelAfter(180_000)]
[UnsupportedOSPlatform("windows")]
public sealed class FrontendTransportTests
{
    private const string Nbdinfo = "/usr/bin/nbdinfo";
    private const string Nbdcopy = "/usr/bin/nbdcopy";
    private const string QemuIo = "/usr/bin/qemu-io";
    private const string QemuImg = "/usr/bin/qemu-img";

    private static async Task<ExternalTool.Result> NbdinfoAsync(params string[] args)
    {
        RealClient.Require(Nbdinfo, "libnbd-bin");
        return await RealClient.RunAsync(Nbdinfo, args, TimeSpan.FromSeconds(30));
    }

    /// <summary>CA, server certificate for 127.0.0.1/localhost and, unless told otherwise, a client certificate.</summary>
    private static void WriteCertificates(string directory, bool client = true, string? otherCaDirectory = null)
    {
        CertificateValidity validity = CertificateValidity.Starting(DateTimeOffset.UtcNow, TimeSpan.FromDays(1));
        using X509Certificate2 ca = TlsCertificates.CreateCa("nbd test ca", validity);
        using var server = TlsCertificates.CreateServer(ca, "nbd-server", ["localhost"], [IPAddress.Loopback], validity);
        TlsCertificates.WriteServer(directory, ca, server, overwrite: true);
        if (client)
        {
            using var clientCertificate = TlsCertificates.CreateClient(ca, "test-client", validity);
            TlsCertificates.WriteClient(directory, ca, clientCertificate, overwrite: true);
        }
        if (otherCaDirectory is not null)
        {
            // Trusts the same server, but its client certificate comes from a CA the server never heard of.
            using X509Certificate2 other = TlsCertificates.CreateCa("stranger ca", validity);
            using var stranger = TlsCertificates.CreateClient(other, "test-client", validity);
            TlsCertificates.WriteClient(otherCaDirectory, other, stranger, overwrite: true);
            File.Copy(Path.Combine(directory, TlsFiles.CaCert), Path.Combine(otherCaDirectory, TlsFiles.CaCert), overwrite: true);
        }
    }

    private static string Nbds(NbdServerProcess server, string certificates) =>
        $"nbds://127.0.0.1:{server.Port}/vol0?tls-certificates={certificates}";

    private static int Attached(NbdServerProcess server) => server.Log.Split('\n').Count(l => l.Contains("attached to export", StringComparison.Ordinal));

    [Test]
    public async Task Nbdinfo_and_qemu_io_over_the_unix_socket_which_is_0600_and_removed_at_exit()
    {
        using var scratch = new ScratchDirectory("unix");
        string socket = scratch.File("nbd.sock");
        using var server = await NbdServerProcess.StartAsync("--memory", "64M", "--unix", socket);
        Assert.That(File.GetUnixFileMode(socket), Is.EqualTo(UnixFileMode.UserRead | UnixFileMode.UserWrite));

        string uri = $"nbd+unix:///vol0?socket={socket}";
        ExternalTool.Result size = await NbdinfoAsync("--size", uri);
        Assert.That((size.ExitCode, size.Output.Trim()), Is.EqualTo((0, RealClient.Invariant(64L << 20))), size.ToString());
        ExternalTool.Result io = await RealClient.QemuIoAsync(uri, "write -P 0x5c 1M 1M", "read -P 0x5c 1M 1M");
        Assert.That(io.ExitCode, Is.EqualTo(0), io.ToString());
        Assert.That(io.Output + io.Error, Does.Not.Contain("Pattern verification failed").And.Contain("read 1048576/1048576 bytes at offset 1048576"), io.ToString());

        Assert.That(await server.StopAsync(TimeSpan.FromSeconds(30)), Is.EqualTo(0));
        Assert.That(new DirectoryInfo(scratch.Path).GetFileSystemInfos().Select(f => f.Name), Does.Not.Contain("nbd.sock"));
    }

    [Test]
    public async Task Nbdinfo_over_tls_with_a_libnbd_certificate_directory()
    {
        using var scratch = new ScratchDirectory("tls-nbdinfo");
        WriteCertificates(scratch.Path);
        using var server = await NbdServerProcess.StartAsync("--memory", "64M", "--tls", "require", "--tls-dir", scratch.Path);
        ExternalTool.Result size = await NbdinfoAsync("--size", Nbds(server, scratch.Path));
        Assert.That((size.ExitCode, size.Output.Trim()), Is.EqualTo((0, RealClient.Invariant(64L << 20))), size.ToString());
        ExternalTool.Result json = await NbdinfoAsync("--json", Nbds(server, scratch.Path));
        Assert.That(json.Output, Does.Contain("\"TLS\": true"), json.ToString());
        Assert.That(server.Log, Does.Contain("TLS: True").And.Not.Contain("TLS: False"), "every connection attached over TLS");
    }

    [Test]
    public async Task A_plaintext_client_of_a_tls_require_server_is_refused_and_nothing_is_served()
    {
        using var scratch = new ScratchDirectory("tls-plain");
        WriteCertificates(scratch.Path);
        using var server = await NbdServerProcess.StartAsync("--memory", "64M", "--tls", "require", "--tls-dir", scratch.Path);
        ExternalTool.Result plain = await NbdinfoAsync("--size", server.Uri());
        Assert.That(plain.ExitCode, Is.Not.EqualTo(0), plain.ToString());
        Assert.That(plain.Output, Does.Not.Contain(RealClient.Invariant(64L << 20)));
        Assert.That(plain.Error, Does.Contain("TLS").IgnoreCase, "libnbd names the reason (ERR_TLS_REQD)");
        Assert.That(Attached(server), Is.EqualTo(0), "no connection reached an export\n" + server.Log);
    }

    [Test]
    public async Task Verify_client_refuses_a_client_without_a_certificate_or_from_another_ca_and_serves_one_from_its_ca()
    {
        using var scratch = new ScratchDirectory("tls-verify");
        using var bare = new ScratchDirectory("tls-verify-bare");
        using var stranger = new ScratchDirectory("tls-verify-stranger");
        WriteCertificates(scratch.Path, otherCaDirectory: stranger.Path);
        File.Copy(Path.Combine(scratch.Path, TlsFiles.CaCert), Path.Combine(bare.Path, TlsFiles.CaCert));
        using var server = await NbdServerProcess.StartAsync("--memory", "64M", "--tls", "require", "--tls-dir", scratch.Path, "--tls-verify-client");

        ExternalTool.Result noCertificate = await NbdinfoAsync("--size", Nbds(server, bare.Path));
        ExternalTool.Result otherCa = await NbdinfoAsync("--size", Nbds(server, stranger.Path));
        Assert.Multiple(() =>
        {
            Assert.That(noCertificate.ExitCode, Is.Not.EqualTo(0), noCertificate.ToString());
            Assert.That(otherCa.ExitCode, Is.Not.EqualTo(0), otherCa.ToString());
            Assert.That(Attached(server), Is.EqualTo(0), server.Log);
        });
        ExternalTool.Result trusted = await NbdinfoAsync("--size", Nbds(server, scratch.Path));
        Assert.That((trusted.ExitCode, trusted.Output.Trim()), Is.EqualTo((0, RealClient.Invariant(64L << 20))), trusted.ToString());
    }

    [Test]
    public async Task Nbdcopy_round_trip_over_tls_preserves_sha256()
    {
        RealClient.Require(Nbdcopy, "libnbd-bin");
        using var scratch = new ScratchDirectory("tls-nbdcopy");
        string certificates = scratch.File("tls");
        Directory.CreateDirectory(certificates);
        WriteCertificates(certificates);
        const long size = 32L << 20;
        string source = scratch.File("source.img");
        string back = scratch.File("back.img");
        string hash = RealClient.WriteRandomFile(source, size, seed: 77);
        using var server = await NbdServerProcess.StartAsync("--memory", "32M", "--tls", "require", "--tls-dir", certificates, "--tls-verify-client");

        ExternalTool.Result upload = await RealClient.RunAsync(Nbdcopy, ["--flush", source, Nbds(server, certificates)], TimeSpan.FromSeconds(90));
        Assert.That(upload.ExitCode, Is.EqualTo(0), upload.ToString());
        ExternalTool.Result download = await RealClient.RunAsync(Nbdcopy, [Nbds(server, certificates), back], TimeSpan.FromSeconds(90));
        Assert.That(download.ExitCode, Is.EqualTo(0), download.ToString());
        Assert.That(RealClient.Sha256(back), Is.EqualTo(hash));
    }

    [Test]
    public async Task Qemu_io_and_qemu_img_over_tls_with_tls_creds_x509()
    {
        RealClient.Require(QemuIo, "qemu-utils");
        using var scratch = new ScratchDirectory("tls-qemu");
        WriteCertificates(scratch.Path);
        using var server = await NbdServerProcess.StartAsync("--memory", "64M", "--tls", "require", "--tls-dir", scratch.Path, "--tls-verify-client");
        string credentials = $"tls-creds-x509,id=tls0,dir={scratch.Path},endpoint=client";
        string image = $"driver=nbd,host=127.0.0.1,port={server.Port},export=vol0,tls-creds=tls0";

        ExternalTool.Result io = await RealClient.RunAsync(QemuIo, ["--object", credentials, "--image-opts", image,
            "-c", "write -P 0xa7 0 4M", "-c", "read -P 0xa7 0 4M", "-c", "read -P 0 4M 1M"]);
        Assert.That(io.ExitCode, Is.EqualTo(0), io.ToString());
        Assert.That(io.Output + io.Error, Does.Not.Contain("Pattern verification failed").And.Contain("read 4194304/4194304 bytes at offset 0"), io.ToString());

        ExternalTool.Result info = await RealClient.RunAsync(QemuImg, ["info", "--object", credentials, "--image-opts", image]);
        Assert.That(info.ExitCode, Is.EqualTo(0), info.ToString());
        Assert.That(info.Output, Does.Contain("64 MiB"), info.ToString());
    }
}
