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

try
{
    return await DownstairsCommandLine.Program.RunAsync(args);
}
catch (Exception e) when (e is IOException or UnauthorizedAccessException or System.Net.Sockets.SocketException)
{
    Console.Error.WriteLine($"nbd-downstairs: {e.Message}");
    return 1;
}

/// <summary><c>run</c> once its settings are valid: serve the region until SIGTERM.</summary>
internal static class DownstairsHost
{
    public static async Task<int> RunAsync(DownstairsOptions options, TlsServerPolicy? tls, bool verbose, string? logJson, System.Net.IPEndPoint? metrics, string? configFile)
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
            // The options pattern for what is bound: IOptions<DownstairsOptions>.
            builder.Services.AddSingleton(Microsoft.Extensions.Options.Options.Create(options));
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
