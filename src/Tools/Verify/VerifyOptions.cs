using System.Globalization;
using NbdServer.Common.Text;

namespace NbdServer.Tools.Verify;

internal sealed record VerifyOptions
{
    public Uri? Uri { get; init; }
    public double DurationSeconds { get; init; } = 10;
    public int QueueDepth { get; init; } = 16;
    public int BlockSize { get; init; } = 4096;
    public long Offset { get; init; }
    public long? Range { get; init; }
    public int? Seed { get; init; }
    public int ReadPercent { get; init; } = 30;
    public int FlushEvery { get; init; } = 64;
    public string? LogPath { get; init; }
    public bool CheckOnly { get; init; }
    public bool NoVerify { get; init; }
    public double DrainTimeoutSeconds { get; init; } = 30;
    public bool Json { get; init; }
    public bool Quiet { get; init; }

    /// <summary>The options from their values by option name (null: not given); a bad value is an <see cref="ArgumentException"/>.</summary>
    public static VerifyOptions Bind(Func<string, string?> value)
    {
        var o = new VerifyOptions();
        int Int(string name, string text, int min) =>
            int.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out int v) && v >= min ? v : throw new ArgumentException($"{name} must be a whole number >= {min}");
        double Seconds(string name, string text) =>
            double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out double v) && v >= 0 ? v : throw new ArgumentException($"{name} must be a number >= 0");
        foreach (string name in Names)
        {
            if (value(name) is not { } text)
            {
                continue;
            }
            o = name switch
            {
                "--uri" => o with { Uri = new Uri(text) },
                "--duration" => o with { DurationSeconds = Seconds(name, text) },
                "--qd" => o with { QueueDepth = Int(name, text, 1) },
                "--block-size" => o with { BlockSize = Int(name, text, BlockPattern.MinBlockSize) },
                "--offset" => o with { Offset = ByteSize.Parse(text, name) },
                "--range" => o with { Range = ByteSize.Parse(text, name) },
                "--seed" => o with { Seed = int.TryParse(text, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out int seed) ? seed : throw new ArgumentException($"{name}: '{text}' is not a whole number") },
                "--read-percent" => o with { ReadPercent = Math.Min(100, Int(name, text, 0)) },
                "--flush-every" => o with { FlushEvery = Int(name, text, 0) },
                "--log" => o with { LogPath = text },
                "--check-only" => o with { CheckOnly = true },
                "--no-verify" => o with { NoVerify = true },
                "--drain-timeout" => o with { DrainTimeoutSeconds = Seconds(name, text) },
                "--json" => o with { Json = true },
                "--quiet" => o with { Quiet = true },
                _ => o,
            };
        }
        if (o.Uri is null)
        {
            throw new ArgumentException("--uri is required");
        }
        if (o.CheckOnly && o.LogPath is null)
        {
            throw new ArgumentException("--check-only needs --log FILE");
        }
        if (o.BlockSize % 512 != 0)
        {
            throw new ArgumentException("--block-size must be a multiple of 512");
        }
        return o;
    }

    private static readonly string[] Names =
    [
        "--uri", "--duration", "--qd", "--block-size", "--offset", "--range", "--seed", "--read-percent", "--flush-every",
        "--log", "--check-only", "--no-verify", "--drain-timeout", "--json", "--quiet",
    ];
}
