using System.Globalization;
using System.Net;
using NbdServer.Common.Text;

namespace NbdServer.Downstairs.Cli;

/// <summary>
/// The values of one command's options once System.CommandLine has parsed them (and, for <c>run</c>,
/// the config file and environment have been layered under them), read with the conversions and
/// messages the commands share. Unknown options never get here: the parser refuses them.
/// </summary>
internal sealed class CommandArgs(Func<string, string?> value)
{
    /// <summary>A flag is on when its value is present (the parser and the settings give "true").</summary>
    public bool Flag(string name) => value(name) is not null;

    public string? String(string name) => value(name);

    public string Required(string name) => String(name) ?? throw new ArgumentException($"{name} is required (see --help)");

    public int Int(string name, int fallback) =>
        String(name) is { } s ? int.TryParse(s, NumberStyles.Integer, CultureInfo.InvariantCulture, out int v) ? v : throw new FormatException($"{name}: '{s}' is not a whole number") : fallback;

    public ulong ULong(string name, ulong fallback) =>
        String(name) is { } s ? ulong.TryParse(s, NumberStyles.Integer, CultureInfo.InvariantCulture, out ulong v) ? v : throw new FormatException($"{name}: '{s}' is not a whole number") : fallback;

    public long Size(string name, long fallback) => String(name) is { } s ? ByteSize.Parse(s, name) : fallback;

    public TimeSpan Seconds(string name, TimeSpan fallback) =>
        String(name) is { } s ? double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out double v) ? TimeSpan.FromSeconds(v) : throw new FormatException($"{name}: '{s}' is not a number of seconds") : fallback;

    public static IPEndPoint Endpoint(string name, string text) =>
        IPEndPoint.TryParse(text, out IPEndPoint? ep) && text.Contains(':', StringComparison.Ordinal) ? ep : throw new FormatException($"{name}: '{text}' is not ADDRESS:PORT (example: 127.0.0.1:3810)");
}
