using System.Net;
using NbdServer.Common.Tls;
using NbdServer.Frontend.Server;

namespace NbdServer.Frontend.Tests;

/// <summary>nbd-server's NBD-side security settings: secure by default, clear errors naming the option.</summary>
public sealed class FrontendSecuritySettingsTests
{
    private string _dir = null!;

    [SetUp]
    public void SetUp() => _dir = Directory.CreateTempSubdirectory("nbd-frontend-tls-").FullName;

    [TearDown]
    public void TearDown() => Directory.Delete(_dir, recursive: true);

    [Test]
    public void A_plaintext_listen_off_loopback_is_refused_naming_the_ways_out()
    {
        var e = Assert.Throws<ArgumentException>(() => ServeCommand.Parse(["--listen", "0.0.0.0:10809"]));
        Assert.That(e!.Message, Does.Contain("--listen 0.0.0.0:10809 is not a loopback address").And.Contain("--tls").And.Contain("--unix").And.Contain("--insecure"));
    }

    [Test]
    public void A_plaintext_listen_off_loopback_is_allowed_with_insecure()
    {
        Assert.That(ServeCommand.Parse(["--listen", "0.0.0.0:10809", "--insecure"]).Frontend.Insecure, Is.True);
    }

    [Test]
    public void Tls_require_with_client_certificates_off_loopback_starts()
    {
        WriteServerCertificates();
        FrontendOptions options = ServeCommand.Parse(["--listen", "0.0.0.0:10809", "--tls", "require", "--tls-dir", _dir, "--tls-verify-client"]).Frontend;
        Assert.That((options.Tls, options.TlsDir, options.TlsVerifyClient, options.Listen!.Address), Is.EqualTo((TlsMode.Require, _dir, true, IPAddress.Any)));
    }

    [Test]
    public void Tls_on_off_loopback_is_refused_because_a_client_may_skip_starttls()
    {
        WriteServerCertificates();
        var e = Assert.Throws<ArgumentException>(() => ServeCommand.Parse(["--listen", "0.0.0.0:10809", "--tls", "on", "--tls-dir", _dir, "--tls-verify-client"]));
        Assert.That(e!.Message, Does.Contain("not required to authenticate").And.Contain("--tls is on"));
    }

    [Test]
    public void Tls_require_off_loopback_without_client_certificates_is_refused()
    {
        WriteServerCertificates();
        var e = Assert.Throws<ArgumentException>(() => ServeCommand.Parse(["--listen", "0.0.0.0:10809", "--tls", "require", "--tls-dir", _dir]));
        Assert.That(e!.Message, Does.Contain("--tls-verify-client is off"));
    }

    [Test]
    public void Tls_without_a_directory_is_refused()
    {
        var e = Assert.Throws<ArgumentException>(() => ServeCommand.Parse(["--tls", "on"]));
        Assert.That(e!.Message, Does.Contain("--tls-dir"));
    }

    [Test]
    public void Tls_verify_client_without_ca_cert_is_refused_naming_the_file()
    {
        WriteServerCertificates();
        File.Delete(Path.Combine(_dir, TlsFiles.CaCert));
        var e = Assert.Throws<ArgumentException>(() => ServeCommand.Parse(["--tls", "require", "--tls-dir", _dir, "--tls-verify-client"]));
        Assert.That(e!.Message, Does.Contain("--tls-dir").And.Contain(TlsFiles.CaCert));
    }

    [Test]
    public void An_unknown_tls_mode_is_refused()
    {
        var e = Assert.Throws<ArgumentException>(() => ServeCommand.Parse(["--tls", "maybe"]));
        Assert.That(e!.Message, Does.Contain("off, on or require"));
    }

    [TestCase("0600", 0x180)]
    [TestCase("660", 0x1b0)]
    public void Unix_mode_is_octal(string text, int expected)
    {
        Assert.That((int)ServeCommand.Parse(["--unix", "/run/nbd.sock", "--unix-mode", text]).Frontend.UnixSocketFileMode(), Is.EqualTo(expected));
    }

    [TestCase("0800")]
    [TestCase("4755")]
    [TestCase("rw")]
    public void A_unix_mode_that_is_not_permission_bits_is_refused(string text)
    {
        var e = Assert.Throws<ArgumentException>(() => ServeCommand.Parse(["--unix", "/run/nbd.sock", "--unix-mode", text]));
        Assert.That(e!.Message, Does.Contain("--unix-mode"));
    }

    [Test]
    public void Listen_none_without_a_unix_socket_is_refused()
    {
        var e = Assert.Throws<ArgumentException>(() => ServeCommand.Parse(["--listen", "none"]));
        Assert.That(e!.Message, Does.Contain("--listen").And.Contain("--unix"));
    }

    [Test]
    public void Listen_none_with_a_unix_socket_serves_only_the_socket()
    {
        FrontendOptions options = ServeCommand.Parse(["--listen", "none", "--unix", "/run/nbd.sock"]).Frontend;
        Assert.That((options.Listen, options.UnixSocketPath), Is.EqualTo(((IPEndPoint?)null, "/run/nbd.sock")));
    }

    private void WriteServerCertificates()
    {
        CertificateValidity validity = CertificateValidity.Starting(DateTimeOffset.UtcNow, TimeSpan.FromDays(1));
        using var ca = TlsCertificates.CreateCa("ca", validity);
        using var server = TlsCertificates.CreateServer(ca, "server", ["localhost"], [IPAddress.Loopback], validity);
        TlsCertificates.WriteServer(_dir, ca, server, overwrite: true);
    }
}
