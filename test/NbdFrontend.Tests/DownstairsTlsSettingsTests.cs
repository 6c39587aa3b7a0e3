using System.Security.Cryptography.X509Certificates;
using NbdServer.Common.Tls;

namespace NbdServer.Frontend.Tests;

/// <summary>nbd-server's settings for the links to its downstairs: secure by default, clear errors.</summary>
public sealed class DownstairsTlsSettingsTests
{
    private const string Remote = "10.0.0.1:3810,10.0.0.2:3810,10.0.0.3:3810";
    private const string Local = "127.0.0.1:3810,127.0.0.1:3811,127.0.0.1:3812";
    private string _dir = null!;

    [SetUp]
    public void SetUp() => _dir = Directory.CreateTempSubdirectory("nbd-tls-settings-").FullName;

    [TearDown]
    public void TearDown() => Directory.Delete(_dir, recursive: true);

    [Test]
    public void Plaintext_to_a_remote_downstairs_is_refused_naming_both_ways_out()
    {
        var e = Assert.Throws<ArgumentException>(() => ServeCommand.Parse(["--downstairs", Remote]));
        Assert.That(e!.Message, Does.Contain("--downstairs 10.0.0.1:3810 is not on this host").And.Contain("--downstairs-tls-dir").And.Contain("--insecure"));
    }

    [Test]
    public void Plaintext_to_a_remote_downstairs_is_allowed_with_insecure_in_any_order()
    {
        Assert.That(ServeCommand.Parse(["--insecure", "--downstairs", Remote]).Engine!.Insecure, Is.True);
        Assert.That(ServeCommand.Parse(["--downstairs", Remote, "--insecure"]).Engine!.Insecure, Is.True);
    }

    [Test]
    public void Plaintext_to_loopback_downstairs_needs_nothing()
    {
        Assert.That(ServeCommand.Parse(["--downstairs", Local]).Engine!.DownstairsTlsDir, Is.Null);
    }

    [Test]
    public void A_tls_directory_without_the_client_key_is_refused_naming_the_file()
    {
        WriteTls();
        File.Delete(Path.Combine(_dir, TlsFiles.ClientKey));
        var e = Assert.Throws<ArgumentException>(() => ServeCommand.Parse(["--downstairs", Remote, "--downstairs-tls-dir", _dir]));
        Assert.That(e!.Message, Does.StartWith("--downstairs-tls-dir:").And.Contain("client-key.pem"));
    }

    [Test]
    public void Names_and_pins_are_one_or_one_per_downstairs()
    {
        WriteTls();
        string pin = new string('a', 64);
        ServeCommand ok = ServeCommand.Parse(["--downstairs", Remote, "--downstairs-tls-dir", _dir, "--downstairs-tls-name", "a,b,c", "--downstairs-tls-pin", pin]);
        Assert.That(ok.Engine!.DownstairsTlsNames, Is.EqualTo(new[] { "a", "b", "c" }));
        Assert.That(ok.Engine.DownstairsTlsPins, Is.EqualTo(new[] { pin }));
        Assert.That(() => ServeCommand.Parse(["--downstairs", Remote, "--downstairs-tls-dir", _dir, "--downstairs-tls-name", "a,b"]),
            Throws.ArgumentException.With.Message.Contains("--downstairs-tls-name needs one name, or one per downstairs"));
        Assert.That(() => ServeCommand.Parse(["--downstairs", Remote, "--downstairs-tls-dir", _dir, "--downstairs-tls-pin", "xyz"]),
            Throws.ArgumentException.With.Message.Contains("--downstairs-tls-pin: 'xyz' is not a SHA-256 fingerprint"));
    }

    [Test]
    public void Names_without_a_tls_directory_are_refused()
    {
        Assert.That(() => ServeCommand.Parse(["--downstairs", Local, "--downstairs-tls-name", "ds"]),
            Throws.ArgumentException.With.Message.Contains("need --downstairs-tls-dir"));
    }

    private void WriteTls()
    {
        DateTimeOffset now = DateTimeOffset.UtcNow;
        using X509Certificate2 ca = TlsCertificates.CreateCa("ca", CertificateValidity.Starting(now, TimeSpan.FromDays(30)));
        using X509Certificate2 client = TlsCertificates.CreateClient(ca, "upstairs", CertificateValidity.Starting(now, TimeSpan.FromDays(10)));
        TlsCertificates.WriteClient(_dir, ca, client, overwrite: true);
    }
}
