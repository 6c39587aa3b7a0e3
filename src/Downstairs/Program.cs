using System.Runtime.InteropServices;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using NbdServer.Common.Posix;
using NbdServer.Common.Hosting;
using NbdServer.Common.Tls;
using NbdServer.Downstairs.Cli;
using NbdServer.Downstairs.Server;
using NbdServer.Downstairs.Storage;
using Serilog;

// libc calls of NbdServer.Common resolve through the process' global symbol scope (as a C program's
// would) instead of a private dlopen("libc.so.6") handle, so an LD_PRELOAD fault injector sees our
// fsync exactly as it sees the runtime's pwrite. Without this, dlsym on the libc handle bypasses
// LD_PRELOAD and the fsync-error test could not exist.
NativeLibrary.SetDllImportResolver(typeof(PosixFile).Assembly, static (name, _, _) =>
    name == "libc" ? NativeLibrary.GetMainProgramHandle() : IntPtr.Zero);

string command = args.Length == 0 ? "--help" : args[0];
string[] rest = args.Length == 0 ? [] : args[1..];
var flags = new HashSet<string>(StringComparer.Ordinal) { "--preallocate", "--verbose", "--fill", "--sticky-dirty", "--insecure" };
try
{
    switch (command)
    {
        case "-h" or "--help" or "help":
            Console.WriteLine(Usage.Main);
            return 0;
        case "create":
        {
            var a = new CommandArgs(rest, flags);
            return a.Help ? PrintHelp(Usage.Create) : Commands.Create(a);
        }
        case "info":
        {
            var a = new CommandArgs(rest, flags);
            return a.Help ? PrintHelp(Usage.Info) : Commands.Info(a);
        }
        case "compare":
            return CompareCommand.Run(rest, Console.Out, Console.Error);
        case "bench":
        {
            var a = new CommandArgs(rest, flags);
            return a.Help ? PrintHelp(Usage.Bench) : await Commands.BenchAsync(a);
        }
        case "run":
        {
            if (rest.Any(r => r is "-h" or "--help"))
            {
                return PrintHelp(Usage.Run);
            }
            // Config file < NBD_DOWNSTAIRS_* environment < command line, all through the one parser.
            ConfigArgs config = ConfigArgs.Build(rest, ConfigArgs.OptionsIn(Usage.Run), new HashSet<string>(StringComparer.Ordinal) { "--verbose", "--sticky-dirty", "--insecure" },
                "NBD_DOWNSTAIRS_", "/etc/nbd-server/nbd-downstairs.json");
            try
            {
                var a = new CommandArgs(config.Arguments, flags);
                bool verbose = a.Flag("--verbose");
                string? logJson = a.String("--log-json");
                System.Net.IPEndPoint? metrics = a.String("--metrics") is { } m ? CommandArgs.Endpoint("--metrics", m) : null;
                DownstairsOptions options = Commands.RunOptions(a);
                a.RejectUnknown();
                // Loaded before anything starts, so a missing or unreadable file is one line and exit 2.
                TlsServerPolicy? tls = options.TlsDir is { } tlsDir
                    ? new TlsServerPolicy(TlsCredentials.LoadServer(tlsDir), requireClientCertificate: true, options.TlsAllowClients) { CoalesceWrites = true, PreferAes128 = true }
                    : null;
                return await RunAsync(options, tls, verbose, logJson, metrics, config.ConfigFile);
            }
            catch (Exception e) when (e is ArgumentException or FormatException or OverflowException)
            {
                Console.Error.WriteLine($"nbd-downstairs: {config.Explain(e.Message)}");
                return 2;
            }
            catch (TlsSetupException e)
            {
                Console.Error.WriteLine($"nbd-downstairs: --tls-dir: {e.Message}");
                return 2;
            }
        }
        default:
            Console.Error.WriteLine($"nbd-downstairs: unknown command '{command}' (create, run, info, compare; see --help)");
            return 2;
    }
}
catch (Exception e) when (e is ArgumentException or FormatException or OverflowException)
{
    Console.Error.WriteLine($"nbd-downstairs: {e.Message}");
    return 2;
}
catch (Exception e) when (e is IOException or UnauthorizedAccessException or System.Net.Sockets.SocketException)
{
    Console.Error.WriteLine($"nbd-downstairs: {e.Message}");
    return 1;
}

static int PrintHelp(string text)
{
    Console.WriteLine(text);
    return 0;
}

static async Task<int> RunAsync(DownstairsOptions options, TlsServerPolicy? tls, bool verbose, string? logJson, System.Net.IPEndPoint? metrics, string? configFile)
{
    Log.Logger = ServiceLogging.Create(verbose, logJson);
    if (configFile is not null)
    {
        Log.Information("Settings from {ConfigFile}", configFile);
    }
    try
    {
        Region region = Region.Open(options.DataDir);
        HostApplicationBuilder builder = Host.CreateApplicationBuilder();
        builder.Services.AddSerilog();
        builder.Services.AddSingleton(options);
        builder.Services.AddSingleton(region);
        if (tls is not null)
        {
            builder.Services.AddSingleton(tls);
        }
        builder.Services.AddOperations(metrics);
        builder.Services.AddHostedService<DownstairsService>();
        using IHost host = builder.Build();
        await host.RunAsync();
        return 0;
    }
    catch (Exception e) when (e is IOException or UnauthorizedAccessException or System.Net.Sockets.SocketException)
    {
        Log.Fatal("nbd-downstairs: {Message}", e.Message);
        return 1;
    }
    finally
    {
        await Log.CloseAndFlushAsync();
    }
}

/// <summary>Serves the region for the lifetime of the host (SIGINT/SIGTERM stop it).</summary>
internal sealed class DownstairsService(Region region, DownstairsOptions options, ILogger<DownstairsService> logger, TlsServerPolicy? tls = null) : IHostedService
{
    private RegionHost? _host;
    private DownstairsServer? _server;

    public Task StartAsync(CancellationToken cancellationToken)
    {
        _host = new RegionHost(region, options, logger);
        RegionGeometry g = region.Geometry;
        DownstairsLog.RegionOpened(logger, Path.GetFullPath(options.DataDir), region.Uuid, g.SizeBytes, g.BlockCount, g.BlockSize, g.ExtentCount, region.HighestGeneration);
        if (region.UncertainAtOpen > 0)
        {
            DownstairsLog.UncertainExtents(logger, Path.GetFullPath(options.DataDir), region.UncertainAtOpen, region.BootAtOpen switch
            {
                BootAtOpen.Same => "recorded so before this restart",
                BootAtOpen.Rebooted => "the machine rebooted since the region was last opened",
                BootAtOpen.NotRecorded => "the region does not record the boot it was last opened in",
                _ => $"this machine's boot id ({BootId.ProcPath}) cannot be read",
            });
        }
        _server = new DownstairsServer(_host, tls);
        _server.Start();
        return Task.CompletedTask;
    }

    public async Task StopAsync(CancellationToken cancellationToken)
    {
        if (_server is not null)
        {
            await _server.DisposeAsync();
        }
        _host?.Dispose();
    }
}
