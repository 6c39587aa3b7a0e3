using System.Net;
using System.Security.Cryptography.X509Certificates;
using NbdServer.Common.Tls;

namespace NbdServer.SystemTests;

/// <summary>
/// The Linux kernel's own NBD client against a real nbd-server process: scripts/kernel-test.sh boots
/// Debian's cloud kernel (it ships nbd.ko) under qemu/TCG with a busybox initramfs; in the guest
/// nbd-client attaches /dev/nbd0 (named export, default export, ioctl interface, two connections),
/// and mkfs.ext4, mount, file checksums, fstrim and e2fsck -fn must all succeed. With a TLS
/// directory the guest also attaches over STARTTLS with a client certificate (nbd-client -certfile
/// -keyfile -cacertfile -tlshostname; Debian's nbd-client is built with GnuTLS).
/// Needs qemu-system-x86, busybox-static, cpio, nbd-client, e2fsprogs and the Debian mirror once
/// (the kernel is cached in .cache/kernel-test/).
/// </summary>
[TestFixture]
[Category("Kernel")]
public sealed class KernelClientTests
{
    private const string SuccessMarker = "KT-RESULT: KERNEL-NBD-OK";

    [Test]
    [CancelAfter(8 * 60 * 1000)]
    public async Task KernelClient_FormatsMountsAndVerifiesFiles_OnMemoryVolume()
    {
        using var server = await NbdServerProcess.StartAsync("--memory", "512M");
        await RunKernelTestAsync(server, "memory");
    }

    [Test]
    [CancelAfter(8 * 60 * 1000)]
    public async Task KernelClient_FormatsMountsAndVerifiesFiles_OnFileVolume()
    {
        string dir = Path.Combine(Path.GetTempPath(), $"kernel-test-{Guid.NewGuid():N}");
        Directory.CreateDirectory(dir);
        try
        {
            using var server = await NbdServerProcess.StartAsync("--file", Path.Combine(dir, "vol0.img"), "--size", "512MiB");
            await RunKernelTestAsync(server, "file");
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Test]
    [CancelAfter(8 * 60 * 1000)]
    public async Task KernelClient_AlsoAttachesOverTlsWithAClientCertificate_OnMemoryVolume()
    {
        string dir = Directory.CreateTempSubdirectory("kernel-test-tls-").FullName;
        try
        {
            CertificateValidity validity = CertificateValidity.Starting(DateTimeOffset.UtcNow, TimeSpan.FromDays(1));
            using (X509Certificate2 ca = TlsCertificates.CreateCa("kernel-test ca", validity))
            using (X509Certificate2 serverCertificate = TlsCertificates.CreateServer(ca, "localhost", ["localhost"], [IPAddress.Loopback], validity))
            using (X509Certificate2 client = TlsCertificates.CreateClient(ca, "kernel", validity))
            {
                TlsCertificates.WriteServer(dir, ca, serverCertificate, overwrite: true);
                TlsCertificates.WriteClient(dir, ca, client, overwrite: true);
            }
            // tls on: rounds 1-4 stay plaintext, the last one upgrades with STARTTLS; a TLS client
            // must present a certificate from our CA.
            using var server = await NbdServerProcess.StartAsync("--memory", "512M", "--tls", "on", "--tls-dir", dir, "--tls-verify-client");
            await RunKernelTestAsync(server, "tls", dir);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    private static async Task RunKernelTestAsync(NbdServerProcess server, string name, string? tlsDir = null)
    {
        string root = Repository.Root;
        string consoleLog = Path.Combine(TestContext.CurrentContext.WorkDirectory, $"kernel-test-{name}-console.log");

        ExternalTool.Result result = await ExternalTool.RunAsync(
            "/usr/bin/env",
            [$"KT_LOG={consoleLog}", "KT_TIMEOUT=420", .. tlsDir is null ? Array.Empty<string>() : [$"KT_TLS_DIR={tlsDir}"],
                Path.Combine(root, "scripts", "kernel-test.sh"), server.Port.ToString(System.Globalization.CultureInfo.InvariantCulture)],
            TimeSpan.FromMinutes(7.5));

        if (File.Exists(consoleLog))
        {
            TestContext.AddTestAttachment(consoleLog, "guest serial console");
        }
        string serverLog = server.Log;
        TestContext.Out.WriteLine(result.Error);
        TestContext.Out.WriteLine("--- nbd-server log ---");
        TestContext.Out.WriteLine(serverLog);

        Assert.That(result.ExitCode, Is.EqualTo(0), $"kernel-test.sh failed\n{result}\n--- nbd-server log ---\n{serverLog}");
        Assert.That(File.ReadAllText(consoleLog), Does.Contain(SuccessMarker));
        if (tlsDir is not null)
        {
            Assert.That(File.ReadAllText(consoleLog), Does.Contain("kt: TLS round passed"));
            Assert.That(serverLog, Does.Contain("TLS: True"), "the last round really ran over TLS");
        }
        Assert.That(serverLog, Does.Match(@"Connection \d+ from 127\.0\.0\.1:\d+ attached to export 'vol0'"));
        Assert.That(serverLog, Does.Contain("client sent NBD_CMD_DISC"), "the kernel should detach cleanly");
        Assert.That(serverLog, Does.Not.Contain(" failed: "), "no command should fail");
        Assert.That(serverLog, Does.Not.Contain("dropped:"), "no protocol violation");
        Assert.That(server.HasExited, Is.False, "nbd-server must survive the kernel client");
    }
}
