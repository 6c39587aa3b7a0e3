using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using NbdServer.Common.Volumes;
using NbdServer.Frontend;
using NbdServer.Frontend.Server;
using NbdServer.Frontend.Volumes;
using Serilog;
using Serilog.Events;

ServeCommand command;
try
{
    command = ServeCommand.Parse(args);
}
catch (Exception e) when (e is ArgumentException or FormatException or OverflowException)
{
    Console.Error.WriteLine($"nbd-server: {e.Message}");
    return 2;
}
if (command.Help)
{
    Console.WriteLine(ServeCommand.Usage);
    return 0;
}

Log.Logger = new LoggerConfiguration()
    .MinimumLevel.Is(command.Verbose ? LogEventLevel.Debug : LogEventLevel.Information)
    .MinimumLevel.Override("Microsoft", LogEventLevel.Warning)
    .WriteTo.Console(outputTemplate: "{Timestamp:HH:mm:ss.fff} {Level:u3} {Message:lj}{NewLine}{Exception}", standardErrorFromLevel: LogEventLevel.Verbose)
    .CreateLogger();

try
{
    IBlockVolume volume = command.FilePath is { } path
        ? FileVolume.Open(path, command.Size, command.ReadOnly)
        : new MemoryVolume(command.Size ?? ServeCommand.DefaultMemorySize, command.ReadOnly);
    var exports = new ExportRegistry([new NbdExport(command.ExportName, volume, command.Description, command.ReadOnly)]);

    HostApplicationBuilder builder = Host.CreateApplicationBuilder();
    builder.Services.AddSerilog();
    builder.Services.AddSingleton(exports);
    builder.Services.AddSingleton(command.Frontend);
    builder.Services.AddHostedService<NbdService>();
    using IHost host = builder.Build();
    await host.RunAsync();
    await volume.DisposeAsync();
    return 0;
}
catch (Exception e) when (e is IOException or UnauthorizedAccessException or InvalidOperationException or ArgumentException or System.Net.Sockets.SocketException)
{
    Log.Fatal("nbd-server: {Message}", e.Message);
    return 1;
}
finally
{
    await Log.CloseAndFlushAsync();
}

/// <summary>Runs the NBD listener for the lifetime of the host (Ctrl-C / SIGTERM drain it).</summary>
internal sealed class NbdService(ExportRegistry exports, FrontendOptions options, ILogger<NbdService> logger) : IHostedService, IAsyncDisposable
{
    private NbdListener? _listener;

    public Task StartAsync(CancellationToken cancellationToken)
    {
        _listener = new NbdListener(exports, options, logger);
        _listener.Start();
        return Task.CompletedTask;
    }

    public Task StopAsync(CancellationToken cancellationToken) => _listener?.StopAsync() ?? Task.CompletedTask;

    public ValueTask DisposeAsync() => _listener?.DisposeAsync() ?? ValueTask.CompletedTask;
}
